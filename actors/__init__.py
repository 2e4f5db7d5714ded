"""Troupe's long-lived actors as plain classes (metrics, session credentials, quota, model
state, traces) and the replicas' side of them (``recorder``); ``placement`` starts them as
named actors on the head node."""

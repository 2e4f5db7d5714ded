"""Names of Troupe's long-lived actors (a light module: no Ray, no prometheus imports)."""

__all__ = ["METRICS_ACTOR", "NAMESPACE", "SESSION_ACTOR"]

#: Ray namespace of every Troupe actor.
NAMESPACE = "troupe"
#: The metrics actor (cost ledger, Prometheus, usage, traces).
METRICS_ACTOR = "troupe-metrics"
#: The session actor (provider credentials).
SESSION_ACTOR = "troupe-session"

"""Unit-layer fixtures."""

from tests.unit.gateway_fakes import gw  # noqa: F401  (the in-process gateway fixture)

"""Unit-layer fixtures."""

from tests.unit.gateway_fakes import gw  # noqa: F401  (the in-process gateway fixture)
from tests.unit.tracing_fakes import trace_buffer  # noqa: F401  (tracing on, spans to a TraceBuffer)

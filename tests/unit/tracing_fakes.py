"""Shared by the tracing tests: a client's trace context, and tracing turned on in this
process with a TraceBuffer as the span sink (the ``trace_buffer`` fixture, which
conftest.py makes available)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import pytest

from actors.traces import TraceBuffer
from serve_app import tracing
from serve_app.tracing import TracingSettings

CLIENT_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"


@pytest.fixture
def trace_buffer() -> Iterator[Callable[..., TraceBuffer]]:
    """Turn tracing on in this process with a TraceBuffer as the span sink."""

    def start(**overrides: Any) -> TraceBuffer:
        buffer = TraceBuffer(max_traces=50, max_spans_per_trace=16)
        settings = TracingSettings(**{"otlp_endpoint": None, **overrides})
        tracing.setup_tracing(settings, "test", buffer.add)
        return buffer

    yield start
    tracing.shutdown_tracing()


def collected(buffer: TraceBuffer, n: int = 10) -> list[dict[str, Any]]:
    assert tracing.flush_tracing(5.0)
    return buffer.recent(n)

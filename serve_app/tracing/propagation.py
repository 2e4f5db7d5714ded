"""W3C trace context across hops: into a plain dict that crosses the Ray handle, and back,
and out of a client's ``traceparent``/``tracestate`` headers."""

from __future__ import annotations

from typing import Iterable, Mapping, Optional

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from serve_app.tracing import process

__all__ = ["inject_context", "extract_context", "context_from_headers"]

_PROPAGATOR = TraceContextTextMapPropagator()


def inject_context(span: Optional[Span] = None) -> Optional[dict[str, str]]:
    """``{"traceparent": ..., ["tracestate": ...]}`` of ``span`` (default: the current one).

    Returns None when tracing is off or there is no valid span context. An unsampled
    span still gives a traceparent (flags ``00``) so downstream hops keep the trace id.
    """
    if process.tracer is None:
        return None
    ctx = (span if span is not None else trace.get_current_span()).get_span_context()
    if not ctx.is_valid:
        return None
    carrier = {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
    if ctx.trace_state:
        carrier["tracestate"] = ctx.trace_state.to_header()
    return carrier


def extract_context(carrier: Optional[Mapping[str, str]]) -> Optional[Context]:
    """The remote parent context in a carrier from :func:`inject_context` (None: none valid)."""
    if process.tracer is None or not carrier:
        return None
    ctx = _PROPAGATOR.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def context_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> Optional[Context]:
    """The client's trace context from ASGI scope headers (``traceparent``/``tracestate``)."""
    if process.tracer is None:
        return None
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name == b"traceparent" or name == b"tracestate":
            carrier[name.decode("latin-1")] = value[:512].decode("latin-1")
    return extract_context(carrier) if "traceparent" in carrier else None

"""Spans: start and end them with explicit parents, mark errors and cancellations, and
``traced`` blocks; the span attribute names Troupe uses."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any, Literal, Mapping, Optional, Union

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode

from serve_app.errors import as_troupe_error
from serve_app.tracing import process

__all__ = [
    "ATTR_MODEL",
    "ATTR_REQUEST_ID",
    "ATTR_INPUT_TOKENS",
    "ATTR_OUTPUT_TOKENS",
    "ATTR_FINISH_REASONS",
    "ATTR_ERROR_CODE",
    "ATTR_CANCELLED",
    "start_span",
    "end_span",
    "record_error",
    "current_span",
    "traced",
]

# Attribute names: OpenTelemetry's GenAI semantic conventions where one exists.
ATTR_MODEL = "gen_ai.request.model"
ATTR_INPUT_TOKENS = "gen_ai.usage.input_tokens"
ATTR_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
ATTR_FINISH_REASONS = "gen_ai.response.finish_reasons"
ATTR_REQUEST_ID = "troupe.request_id"
ATTR_ERROR_CODE = "troupe.error.code"
ATTR_CANCELLED = "troupe.cancelled"

_STATUS_DESCRIPTION_MAX = 300


def start_span(
    name: str,
    *,
    parent: Union[Context, Span, None] = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Optional[Mapping[str, Any]] = None,
) -> Span:
    """Start a span; end it with :func:`end_span`. Not made current (see the module doc).

    Args:
        parent: a context (from :func:`extract_context`), a parent span, or None for
            the current context (a new root when there is none).
    """
    tracer = process.tracer
    if tracer is None:
        return INVALID_SPAN
    if parent is not None and not isinstance(parent, Context):
        parent = trace.set_span_in_context(parent)
    return tracer.start_span(name, context=parent, kind=kind, attributes=attributes)


def end_span(
    span: Span,
    error: Optional[BaseException] = None,
    attributes: Optional[Mapping[str, Any]] = None,
) -> None:
    """End ``span``: a cancellation is marked ``troupe.cancelled``, an error is ERROR + code."""
    if not span.is_recording():
        return
    if attributes:
        span.set_attributes(attributes)
    if error is not None:
        if isinstance(error, (asyncio.CancelledError, GeneratorExit)):
            span.set_attribute(ATTR_CANCELLED, True)
        else:
            record_error(span, error)
    span.end()


def record_error(span: Span, error: BaseException) -> None:
    """Mark ``span`` failed: status ERROR described by the Troupe code, code attributes."""
    if not span.is_recording():
        return
    err = as_troupe_error(error)
    span.set_attributes({ATTR_ERROR_CODE: err.code, "error.type": err.code})
    if err is not error:
        span.set_attribute("exception.type", type(error).__name__)
    description = f"{err.code}: {err.message}"[:_STATUS_DESCRIPTION_MAX]
    span.set_status(Status(StatusCode.ERROR, description))


def current_span() -> Span:
    """The span of the current context (the gateway's request span inside a route)."""
    if process.tracer is None:
        return INVALID_SPAN
    return trace.get_current_span()


class _SpanScope:
    """``with traced(...) as span:``: the span is current inside the block, then ended."""

    __slots__ = ("_args", "_span", "_token")

    def __init__(self, name: str, parent: Any, kind: SpanKind, attributes: Any) -> None:
        self._args = (name, parent, kind, attributes)
        self._span: Span = INVALID_SPAN
        self._token: Any = None

    def __enter__(self) -> Span:
        name, parent, kind, attributes = self._args
        self._span = start_span(name, parent=parent, kind=kind, attributes=attributes)
        self._token = otel_context.attach(trace.set_span_in_context(self._span))
        return self._span

    def __exit__(
        self,
        exc_type: Optional[type[BaseException]],
        exc: Optional[BaseException],
        tb: Optional[TracebackType],
    ) -> Literal[False]:
        otel_context.detach(self._token)
        end_span(self._span, exc)
        return False


class _NoSpanScope:
    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(self, *exc: object) -> Literal[False]:
        return False


_NO_SPAN_SCOPE = _NoSpanScope()


def traced(
    name: str,
    *,
    parent: Union[Context, Span, None] = None,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Optional[Mapping[str, Any]] = None,
) -> Any:
    """A span around a block, current inside it (use in coroutines, not across a ``yield``)."""
    if process.tracer is None:
        return _NO_SPAN_SCOPE
    return _SpanScope(name, parent, kind, attributes)


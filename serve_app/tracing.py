"""OpenTelemetry tracing: one trace per request across gateway, deployment and engine.

::

    client ──traceparent──> TracingMiddleware     gateway: SERVER span "POST /v1/chat/completions"
                              │ GatewayCore.build_request: inject_context() -> trace_context
                              ▼ (a plain dict crosses the Ray handle in GenerationRequest)
                            LLMDeployment.stream   model replica: SERVER span "deployment.stream"
                              └── "engine.generate"  same process, explicit parent

Each process calls :func:`setup_tracing` once. Finished spans go through the SDK's
``BatchSpanProcessor`` (a background thread, so the request path only enqueues) to a
:class:`BufferingSpanExporter`, which turns them into plain dicts and hands each batch to
a sink: in a replica, :class:`ActorSpanSink` sends it to the metrics actor, whose
``actors.traces.TraceBuffer`` serves ``GET /traces``. With an OTLP endpoint configured,
a second processor also exports OTLP/HTTP.

We keep a private ``TracerProvider`` rather than the global one: Ray Serve's own tracing
(``RAY_SERVE_TRACING_EXPORTER_IMPORT_PATH``) installs a global provider of its own, and
tests build many. Parents are passed explicitly (``parent=``), never through the current
context across an async generator's ``yield``: a stream's consumer may resume it from
another task, where a context token cannot be reset.

When tracing is off (or :func:`setup_tracing` was never called), every helper returns at
once: ``start_span`` gives the shared no-op span, ``inject_context`` gives ``None``.

This module imports neither Ray (except lazily in :class:`ActorSpanSink`) nor torch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from types import TracebackType
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, Union

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import as_troupe_error
from serve_app.settings.observability import TracingSettings

__all__ = [
    "TracingSettings",
    "SpanKind",
    "Span",
    "INVALID_SPAN",
    "SpanSink",
    "ATTR_MODEL",
    "ATTR_REQUEST_ID",
    "ATTR_INPUT_TOKENS",
    "ATTR_OUTPUT_TOKENS",
    "ATTR_FINISH_REASONS",
    "ATTR_ERROR_CODE",
    "ATTR_CANCELLED",
    "setup_tracing",
    "shutdown_tracing",
    "flush_tracing",
    "tracing_enabled",
    "start_span",
    "end_span",
    "record_error",
    "current_span",
    "traced",
    "inject_context",
    "extract_context",
    "context_from_headers",
    "TracingMiddleware",
    "BufferingSpanExporter",
    "span_to_dict",
    "ActorSpanSink",
]

logger = logging.getLogger("troupe.tracing")

#: A callable that receives each exported batch of span dicts (see :func:`span_to_dict`).
SpanSink = Callable[[list[dict[str, Any]]], None]

# Attribute names: OpenTelemetry's GenAI semantic conventions where one exists.
ATTR_MODEL = "gen_ai.request.model"
ATTR_INPUT_TOKENS = "gen_ai.usage.input_tokens"
ATTR_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
ATTR_FINISH_REASONS = "gen_ai.response.finish_reasons"
ATTR_REQUEST_ID = "troupe.request_id"
ATTR_ERROR_CODE = "troupe.error.code"
ATTR_CANCELLED = "troupe.cancelled"

_OTLP_PACKAGE = "opentelemetry-exporter-otlp-proto-http"
_STATUS_DESCRIPTION_MAX = 300


# ------------------------------------------------------------------ process state

_lock = threading.Lock()
_provider: Optional[TracerProvider] = None
_tracer: Optional[trace.Tracer] = None  # None <=> tracing off in this process (the fast path)
_configured = False
_PROPAGATOR = TraceContextTextMapPropagator()


def setup_tracing(
    settings: TracingSettings,
    process_role: str,
    span_sink: Optional[SpanSink] = None,
) -> bool:
    """Configure tracing for this process; later calls are no-ops until :func:`shutdown_tracing`.

    Args:
        settings: the ``tracing`` section of the settings tree.
        process_role: what this process is ("gateway", "model"); stamped on its spans.
        span_sink: receives batches of finished spans as dicts (for ``GET /traces``).

    Returns:
        True when this process records spans.
    """
    global _provider, _tracer, _configured
    with _lock:
        if _configured:
            return _tracer is not None
        _configured = True
        if not settings.enabled:
            return False
        provider = TracerProvider(
            sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
            resource=Resource.create(
                {"service.name": settings.service_name, "troupe.process.role": process_role}
            ),
            span_limits=SpanLimits(max_attributes=64, max_events=16, max_attribute_length=1024),
        )
        if span_sink is not None:
            provider.add_span_processor(
                BatchSpanProcessor(
                    BufferingSpanExporter(span_sink, role=process_role),
                    schedule_delay_millis=settings.export_interval_ms,
                )
            )
        if settings.otlp_endpoint:
            otlp = _otlp_exporter(settings.otlp_endpoint)
            if otlp is not None:
                provider.add_span_processor(BatchSpanProcessor(otlp))
        _provider = provider
        _tracer = provider.get_tracer("troupe")
        return True


def _otlp_exporter(endpoint: str) -> Optional[SpanExporter]:
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter,
        )
    except ImportError:
        logger.warning(
            "OTLP export is configured (otlp_endpoint=%s) but %s is not installed, so no "
            "spans are exported there; GET /traces still works. Install it with: "
            "pip install %s",
            endpoint, _OTLP_PACKAGE, _OTLP_PACKAGE,
        )
        return None
    # Like OTEL_EXPORTER_OTLP_ENDPOINT, the setting is the collector's base URL.
    url = endpoint.rstrip("/")
    if not url.endswith("/v1/traces"):
        url += "/v1/traces"
    return OTLPSpanExporter(endpoint=url)


def shutdown_tracing() -> None:
    """Flush and stop this process's tracing; :func:`setup_tracing` may run again."""
    global _provider, _tracer, _configured
    with _lock:
        provider, _provider, _tracer, _configured = _provider, None, None, False
    if provider is not None:
        provider.shutdown()


def flush_tracing(timeout_s: float = 5.0) -> bool:
    """Export every finished span now (tests, replica shutdown). True when all went out."""
    provider = _provider
    return True if provider is None else provider.force_flush(int(timeout_s * 1000))


def tracing_enabled() -> bool:
    return _tracer is not None


# ------------------------------------------------------------------ spans


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
    tracer = _tracer
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
    if _tracer is None:
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
    ) -> bool:
        otel_context.detach(self._token)
        end_span(self._span, exc)
        return False


class _NoSpanScope:
    __slots__ = ()

    def __enter__(self) -> Span:
        return INVALID_SPAN

    def __exit__(self, *exc: object) -> bool:
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
    if _tracer is None:
        return _NO_SPAN_SCOPE
    return _SpanScope(name, parent, kind, attributes)


# ------------------------------------------------------------------ W3C propagation


def inject_context(span: Optional[Span] = None) -> Optional[dict[str, str]]:
    """``{"traceparent": ..., ["tracestate": ...]}`` of ``span`` (default: the current one).

    Returns None when tracing is off or there is no valid span context. An unsampled
    span still gives a traceparent (flags ``00``) so downstream hops keep the trace id.
    """
    if _tracer is None:
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
    if _tracer is None or not carrier:
        return None
    ctx = _PROPAGATOR.extract(carrier)
    return ctx if trace.get_current_span(ctx).get_span_context().is_valid else None


def context_from_headers(headers: Iterable[tuple[bytes, bytes]]) -> Optional[Context]:
    """The client's trace context from ASGI scope headers (``traceparent``/``tracestate``)."""
    if _tracer is None:
        return None
    carrier: dict[str, str] = {}
    for name, value in headers:
        if name == b"traceparent" or name == b"tracestate":
            carrier[name.decode("latin-1")] = value[:512].decode("latin-1")
    return extract_context(carrier) if "traceparent" in carrier else None


# ------------------------------------------------------------------ gateway middleware

_UNTRACED_PATHS = frozenset(
    {"/", "/health", "/metrics", "/traces", "/favicon.ico", "/docs", "/openapi.json"}
)


class TracingMiddleware:
    """Pure ASGI: one SERVER span per HTTP request, a child of the client's ``traceparent``.

    The span is the current span while the app runs (routes, error handlers and the
    streamed body all see it), so ``inject_context()`` in the gateway core needs no
    arguments; it ends when the response (stream included) is finished. WebSocket
    connections get no span of their own: the client's context from the handshake is
    made current, and each WS request opens its own span under it. Place it inside
    ``RequestIdMiddleware`` so the request id is in scope state.
    """

    def __init__(self, app: Any, untraced_paths: Iterable[str] = _UNTRACED_PATHS) -> None:
        self.app = app
        self.untraced_paths = frozenset(untraced_paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        tracer = _tracer
        kind = scope["type"]
        untraced = kind not in ("http", "websocket") or scope["path"] in self.untraced_paths
        if tracer is None or untraced:
            await self.app(scope, receive, send)
            return
        parent = context_from_headers(scope.get("headers", ()))
        if kind == "websocket":
            if parent is None:
                await self.app(scope, receive, send)
                return
            token = otel_context.attach(parent)
            try:
                await self.app(scope, receive, send)
            finally:
                otel_context.detach(token)
            return
        method = scope.get("method", "GET")
        span = tracer.start_span(
            f"{method} {scope['path']}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": scope["path"],
                ATTR_REQUEST_ID: scope.get("state", {}).get("request_id", ""),
            },
        )
        if not span.is_recording():  # sampled out: keep the context, skip the bookkeeping
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            try:
                await self.app(scope, receive, send)
            finally:
                otel_context.detach(token)
            return

        async def send_traced(message: Any) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                span.set_attribute("http.response.status_code", status)
                if status >= 500 and span.status.status_code is StatusCode.UNSET:
                    span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            await send(message)

        token = otel_context.attach(trace.set_span_in_context(span, parent))
        error: Optional[BaseException] = None
        try:
            await self.app(scope, receive, send_traced)
        except BaseException as exc:
            error = exc
            raise
        finally:
            otel_context.detach(token)
            route = scope.get("route")
            route_path = getattr(route, "path", None)  # FastAPI's matched template
            if route_path:
                span.update_name(f"{method} {route_path}")
            end_span(span, error)


# ------------------------------------------------------------------ export


def span_to_dict(span: ReadableSpan, role: Optional[str] = None) -> dict[str, Any]:
    """A finished span as plain, picklable data (the format ``TraceBuffer`` groups)."""
    ctx = span.context
    parent = span.parent
    status = span.status
    attributes = span.attributes.copy() if span.attributes else {}  # a mappingproxy
    for key, value in attributes.items():
        if type(value) is tuple:  # sequence attributes: JSON-shaped lists
            attributes[key] = list(value)
    return {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent is not None else None,
        "name": span.name,
        "kind": _KIND_NAMES[span.kind],
        "start_unix_nano": span.start_time,
        "end_unix_nano": span.end_time,
        "attributes": attributes,
        "status": {"code": _STATUS_NAMES[status.status_code], "description": status.description},
        "role": role,
    }


_KIND_NAMES = {kind: kind.name.lower() for kind in SpanKind}
_STATUS_NAMES = {code: code.name for code in StatusCode}


class BufferingSpanExporter(SpanExporter):
    """Hands each batch of finished spans, as dicts, to a sink (runs on the SDK's thread).

    Args:
        sink: called once per batch, e.g. :class:`ActorSpanSink` or ``TraceBuffer.add``.
        role: the process role stamped on each span ("gateway", "model").
    """

    def __init__(self, sink: SpanSink, role: Optional[str] = None) -> None:
        self._sink = sink
        self._role = role
        self._failures = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        role = self._role
        batch = [span_to_dict(s, role) for s in spans]
        try:
            self._sink(batch)
        except Exception as exc:  # a lost batch must never break the exporter thread
            self._failures += 1
            if self._failures == 1 or self._failures % 100 == 0:
                logger.warning(
                    "dropped %d finished spans: the trace sink failed (%s: %s); %d failures so far",
                    len(batch), type(exc).__name__, exc, self._failures,
                )
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class ActorSpanSink:
    """A span sink that sends each batch, fire-and-forget, to the metrics actor's ``record_spans``.

    The actor is looked up on the first batch (on the exporter's thread, off the request
    path) and again after a failure, so a restarted metrics actor is found.

    Args:
        actor_name: the metrics actor's name.
        namespace: its Ray namespace (None: the current one).
        resolve: returns the actor handle (tests pass a fake); default ``ray.get_actor``.
    """

    def __init__(
        self,
        actor_name: str,
        namespace: Optional[str] = None,
        resolve: Optional[Callable[[], Any]] = None,
    ) -> None:
        self._actor_name = actor_name
        self._namespace = namespace
        self._resolve = resolve or self._get_actor
        self._actor: Any = None

    def _get_actor(self) -> Any:
        import ray  # lazy: this module must import without Ray

        return ray.get_actor(self._actor_name, namespace=self._namespace)

    def __call__(self, spans: list[dict[str, Any]]) -> None:
        if self._actor is None:
            self._actor = self._resolve()
        try:
            self._actor.record_spans.remote(spans)
        except Exception:
            self._actor = None  # look it up again next batch
            raise

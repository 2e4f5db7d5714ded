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

This package imports neither Ray (except lazily in :class:`ActorSpanSink`) nor torch.
Modules: ``process.py`` (setup, flush, shutdown), ``spans.py`` (spans, errors, attribute
names), ``propagation.py`` (W3C context in and out), ``middleware.py`` (the gateway's
ASGI middleware), ``export.py`` (span dicts, the buffering exporter, the actor sink).
"""

from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from serve_app.settings.observability import TracingSettings
from serve_app.tracing.export import (
    ActorSpanSink,
    BufferingSpanExporter,
    SpanSink,
    span_to_dict,
)
from serve_app.tracing.middleware import TracingMiddleware
from serve_app.tracing.process import (
    flush_tracing,
    setup_tracing,
    shutdown_tracing,
    tracing_enabled,
)
from serve_app.tracing.propagation import (
    context_from_headers,
    extract_context,
    inject_context,
)
from serve_app.tracing.spans import (
    ATTR_CANCELLED,
    ATTR_ERROR_CODE,
    ATTR_FINISH_REASONS,
    ATTR_INPUT_TOKENS,
    ATTR_MODEL,
    ATTR_OUTPUT_TOKENS,
    ATTR_REQUEST_ID,
    current_span,
    end_span,
    record_error,
    start_span,
    traced,
)

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

"""This process's tracing: set up once (a private ``TracerProvider`` with its processors),
flushed, shut down. :data:`tracer` is None while tracing is off, which every helper
checks first (the fast path)."""

from __future__ import annotations

import logging
import threading
from typing import Optional

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from serve_app.settings.observability import TracingSettings
from serve_app.tracing.export import BufferingSpanExporter, SpanSink

__all__ = ["setup_tracing", "shutdown_tracing", "flush_tracing", "tracing_enabled", "tracer"]

logger = logging.getLogger("troupe.tracing")

_OTLP_PACKAGE = "opentelemetry-exporter-otlp-proto-http"

_lock = threading.Lock()
_provider: Optional[TracerProvider] = None
tracer: Optional[trace.Tracer] = None  # None <=> tracing off in this process (the fast path)
_configured = False


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
    global _provider, tracer, _configured
    with _lock:
        if _configured:
            return tracer is not None
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
        tracer = provider.get_tracer("troupe")
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
    global _provider, tracer, _configured
    with _lock:
        provider, _provider, tracer, _configured = _provider, None, None, False
    if provider is not None:
        provider.shutdown()


def flush_tracing(timeout_s: float = 5.0) -> bool:
    """Export every finished span now (tests, replica shutdown). True when all went out."""
    provider = _provider
    return True if provider is None else provider.force_flush(int(timeout_s * 1000))


def tracing_enabled() -> bool:
    return tracer is not None

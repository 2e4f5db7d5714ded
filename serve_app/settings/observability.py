"""Tracing settings: plain pydantic, so reading a config never imports the OpenTelemetry SDK.

``serve_app.tracing`` applies them in each process.
"""

from __future__ import annotations

import os
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["TracingSettings"]


class TracingSettings(BaseModel):
    """Tracing of requests across the gateway, the model deployments and the engines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        True, description="Create spans and propagate W3C trace context. Off: no spans at all."
    )
    sample_ratio: float = Field(
        1.0, ge=0.0, le=1.0,
        description="Share of new traces recorded (parent-based: a client's traceparent "
        "keeps its own sampled flag; unsampled traces still propagate their trace id).",
    )
    service_name: str = Field(
        "troupe", min_length=1, description="OpenTelemetry service.name of every span."
    )
    max_traces_kept: int = Field(
        200, ge=1, le=100_000,
        description="Finished traces the metrics actor keeps for GET /traces.",
    )
    max_spans_per_trace: int = Field(
        64, ge=1, le=10_000,
        description="Spans kept per trace in GET /traces (later ones are dropped).",
    )
    export_interval_ms: int = Field(
        1000, ge=10, le=60_000,
        description="How often each process sends its finished spans (one batch per interval).",
    )
    otlp_endpoint: Optional[str] = Field(
        default_factory=lambda: os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None,
        description="OTLP/HTTP collector base URL, e.g. http://localhost:4318 (/v1/traces is "
        "appended). Default: $OTEL_EXPORTER_OTLP_ENDPOINT; unset: no OTLP export.",
    )

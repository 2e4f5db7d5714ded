"""Tracing setup and export without Ray: idempotent setup, the buffering exporter and its
sink, span dicts, the actor sink, OTLP/HTTP export, and the tracing settings."""

from __future__ import annotations

import http.server
import logging
import pickle
import sys
import threading
from typing import Any, ClassVar

import pytest
from pydantic import ValidationError

from actors.traces import TraceBuffer
from serve_app import tracing
from serve_app.tracing import (
    ActorSpanSink,
    BufferingSpanExporter,
    TracingSettings,
)
from tests.conftest import wait_until
from tests.unit.tracing_fakes import collected


# ---------------------------------------------------------------- setup and export


def test_setup_is_idempotent_per_process(trace_buffer) -> None:
    buffer = trace_buffer()
    other = TraceBuffer()
    assert tracing.setup_tracing(TracingSettings(otlp_endpoint=None), "again", other.add) is True
    tracing.end_span(tracing.start_span("x"))
    assert len(collected(buffer)) == 1 and len(other) == 0


def test_a_failing_sink_loses_the_batch_but_not_the_exporter(caplog) -> None:
    calls: list = []

    def sink(spans: list) -> None:
        calls.append(spans)
        if len(calls) == 1:
            raise ConnectionError("metrics actor is restarting")

    exporter = BufferingSpanExporter(sink, role="gateway")
    provider_spans = _finished_spans(2)
    with caplog.at_level(logging.WARNING, logger="troupe.tracing"):
        assert exporter.export(provider_spans).name == "FAILURE"
    assert "metrics actor is restarting" in caplog.text
    assert exporter.export(provider_spans).name == "SUCCESS"
    assert [s["role"] for s in calls[1]] == ["gateway", "gateway"]


def _finished_spans(n: int) -> list:
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("t")
    spans = []
    for i in range(n):
        span = tracer.start_span(f"s{i}", attributes={"tags": ("a", "b")})
        span.end()
        spans.append(span)
    return spans


def test_span_dicts_are_plain_picklable_data() -> None:
    (span,) = [tracing.span_to_dict(s, "model") for s in _finished_spans(1)]
    assert pickle.loads(pickle.dumps(span)) == span
    assert span["attributes"] == {"tags": ["a", "b"]}
    assert len(span["trace_id"]) == 32 and len(span["span_id"]) == 16
    assert span["end_unix_nano"] >= span["start_unix_nano"] > 0


class FakeMetricsActor:
    """Stands in for a Ray actor handle: ``record_spans.remote(spans)``."""

    def __init__(self, fail_once: bool = False) -> None:
        self.batches: list = []
        self.fail_once = fail_once
        self.record_spans = self

    def remote(self, spans: list) -> None:
        if self.fail_once:
            self.fail_once = False
            raise RuntimeError("actor died")
        self.batches.append(spans)


def test_actor_sink_looks_the_actor_up_lazily_and_again_after_a_failure() -> None:
    actors = [FakeMetricsActor(fail_once=True), FakeMetricsActor()]
    lookups: list = []

    def resolve() -> FakeMetricsActor:
        lookups.append(1)
        return actors[len(lookups) - 1]

    sink = ActorSpanSink("troupe-metrics", resolve=resolve)
    assert lookups == []
    with pytest.raises(RuntimeError):
        sink([{"trace_id": "a"}])
    sink([{"trace_id": "b"}])
    sink([{"trace_id": "c"}])
    assert len(lookups) == 2
    assert actors[1].batches == [[{"trace_id": "b"}], [{"trace_id": "c"}]]


class FakeCollector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list] = []

    def do_POST(self) -> None:  # http.server's naming
        body = self.rfile.read(int(self.headers["Content-Length"]))
        FakeCollector.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_spans_are_exported_over_otlp_http_when_an_endpoint_is_set(trace_buffer) -> None:
    FakeCollector.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeCollector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        buffer = trace_buffer(otlp_endpoint=f"http://127.0.0.1:{server.server_address[1]}/")
        tracing.end_span(tracing.start_span("exported-span"))
        tracing.flush_tracing(10.0)
        path, content_type, body = wait_until(lambda: FakeCollector.received and FakeCollector.received[0], 10)
        assert path == "/v1/traces" and content_type == "application/x-protobuf"
        assert b"exported-span" in body
        assert len(buffer) == 1  # /traces keeps working alongside OTLP
    finally:
        server.shutdown()
        server.server_close()


def test_a_missing_otlp_package_is_a_clear_warning_not_a_failure(trace_buffer, monkeypatch, caplog) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.exporter.otlp.proto.http.trace_exporter", None)
    with caplog.at_level(logging.WARNING, logger="troupe.tracing"):
        buffer = trace_buffer(otlp_endpoint="http://collector:4318")
    assert "pip install opentelemetry-exporter-otlp-proto-http" in caplog.text
    tracing.end_span(tracing.start_span("still-buffered"))
    assert collected(buffer)[0]["root_name"] == "still-buffered"


# ---------------------------------------------------------------- settings


def test_settings_are_strict_described_and_read_the_otlp_env(monkeypatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://otel:4318")
    assert TracingSettings().otlp_endpoint == "http://otel:4318"
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    defaults = TracingSettings()
    assert (defaults.enabled, defaults.sample_ratio, defaults.service_name, defaults.max_traces_kept) == (
        True, 1.0, "troupe", 200,
    )
    assert defaults.otlp_endpoint is None
    assert all(f.description for f in TracingSettings.model_fields.values())
    with pytest.raises(ValidationError, match="sample_rate"):
        TracingSettings(sample_rate=0.5)
    with pytest.raises(ValidationError, match="sample_ratio"):
        TracingSettings(sample_ratio=1.5)

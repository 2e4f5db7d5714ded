"""Tracing without Ray: the three hops of one request simulated in-process.

The gateway hop is the real ``TracingMiddleware`` over a tiny ASGI app; the carrier
crosses a pickle round trip, as it does inside a GenerationRequest over a Ray handle;
the deployment/engine hop follows the span pattern of ``LLMDeployment.stream``.
Finished spans go through the real BatchSpanProcessor -> BufferingSpanExporter ->
TraceBuffer path, exactly as in a replica (with the buffer standing in for the actor).
"""

from __future__ import annotations

import asyncio
import http.server
import logging
import pickle
import subprocess
import sys
import threading
import time
from typing import Any, AsyncIterator, Callable, ClassVar, Iterator, Optional

import pytest
from pydantic import ValidationError

from actors.traces import TraceBuffer
from serve_app import tracing
from serve_app.errors import InferenceFailed, TroupeError
from serve_app.tracing import (
    ATTR_CANCELLED,
    ATTR_ERROR_CODE,
    ATTR_FINISH_REASONS,
    ATTR_INPUT_TOKENS,
    ATTR_MODEL,
    ATTR_OUTPUT_TOKENS,
    ATTR_REQUEST_ID,
    ActorSpanSink,
    BufferingSpanExporter,
    SpanKind,
    TracingMiddleware,
    TracingSettings,
)
from tests.conftest import wait_until

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


# ---------------------------------------------------------------- the three hops


async def model_replica_stream(
    carrier_bytes: bytes, tokens: int = 3, fail: Optional[BaseException] = None
) -> AsyncIterator[str]:
    """What LLMDeployment.stream does with spans (the proposed edit), over a fake engine."""
    carrier = pickle.loads(carrier_bytes)  # as the replica receives it
    span = tracing.start_span(
        "deployment.stream",
        parent=tracing.extract_context(carrier),
        kind=SpanKind.SERVER,
        attributes={ATTR_MODEL: "mock-small", ATTR_REQUEST_ID: "req_1"},
    )
    engine_span = tracing.start_span(
        "engine.generate", parent=span, attributes={ATTR_MODEL: "mock-small", ATTR_REQUEST_ID: "req_1"}
    )
    failure: Optional[BaseException] = None
    completion = 0
    finish: Optional[str] = None
    try:
        for i in range(tokens):
            await asyncio.sleep(0)
            if fail is not None and i == 1:
                raise fail
            completion += 1
            if i == tokens - 1:
                finish = "stop"
            yield f"t{i}"
    except (asyncio.CancelledError, GeneratorExit) as exc:
        failure = None if finish is not None else exc
        raise
    except Exception as exc:
        failure = exc
        raise
    finally:
        usage = {ATTR_INPUT_TOKENS: 7, ATTR_OUTPUT_TOKENS: completion}
        if finish is not None:
            usage[ATTR_FINISH_REASONS] = (finish,)
        tracing.end_span(engine_span, failure, usage)
        tracing.end_span(span, failure)


def gateway_app(
    carriers: list[Optional[dict[str, str]]],
    fail: Optional[BaseException] = None,
    status: int = 200,
    cancel_after: Optional[int] = None,
) -> Callable[..., Any]:
    """A route: inject the current context (as GatewayCore.build_request will), stream."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        carrier = tracing.inject_context()
        carriers.append(carrier)
        stream = model_replica_stream(pickle.dumps(carrier), fail=fail)
        await send({"type": "http.response.start", "status": status, "headers": []})
        try:
            n = 0
            async for token in stream:
                await send({"type": "http.response.body", "body": token.encode(), "more_body": True})
                n += 1
                if cancel_after is not None and n >= cancel_after:
                    break  # the client went away: the gateway closes the stream
        except TroupeError as exc:
            tracing.record_error(tracing.current_span(), exc)  # as error_event_data will
        finally:
            await stream.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def call(app: Any, path: str = "/v1/chat/completions", headers: Optional[list] = None) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers if headers is not None else [(b"traceparent", CLIENT_TRACEPARENT.encode())],
        "state": {"request_id": "req_1"},
    }
    await TracingMiddleware(app)(scope, receive, send)
    return sent


def by_name(trace: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in trace["spans"]}


async def test_one_request_is_one_connected_trace_with_the_clients_trace_id(trace_buffer) -> None:
    buffer = trace_buffer()
    carriers: list = []
    await call(gateway_app(carriers))
    traces = collected(buffer)
    assert len(traces) == 1
    trace = traces[0]
    assert trace["trace_id"] == CLIENT_TRACE_ID
    assert trace["root_name"] == "POST /v1/chat/completions"
    spans = by_name(trace)
    gateway, deployment, engine = (
        spans["POST /v1/chat/completions"], spans["deployment.stream"], spans["engine.generate"],
    )
    assert gateway["parent_id"] == CLIENT_SPAN_ID
    assert deployment["parent_id"] == gateway["span_id"]
    assert engine["parent_id"] == deployment["span_id"]
    assert {s["trace_id"] for s in trace["spans"]} == {CLIENT_TRACE_ID}
    assert gateway["kind"] == "server" and deployment["kind"] == "server"
    assert gateway["attributes"][ATTR_REQUEST_ID] == "req_1"
    assert gateway["attributes"]["http.response.status_code"] == 200
    assert engine["attributes"] == {
        ATTR_MODEL: "mock-small", ATTR_REQUEST_ID: "req_1",
        ATTR_INPUT_TOKENS: 7, ATTR_OUTPUT_TOKENS: 3, ATTR_FINISH_REASONS: ["stop"],
    }
    assert all(s["status"]["code"] == "UNSET" for s in trace["spans"])
    # The gateway span covers the whole stream; the engine span sits inside the deployment's.
    assert gateway["start_unix_nano"] <= deployment["start_unix_nano"] <= engine["start_unix_nano"]
    assert engine["end_unix_nano"] <= deployment["end_unix_nano"] <= gateway["end_unix_nano"]
    assert trace["duration_ms"] == pytest.approx(
        (gateway["end_unix_nano"] - gateway["start_unix_nano"]) / 1e6, abs=1e-3
    )
    # What crossed the handle: a small plain dict naming the gateway span as parent.
    assert carriers == [{"traceparent": f"00-{CLIENT_TRACE_ID}-{gateway['span_id']}-01"}]


async def test_without_a_client_traceparent_the_gateway_starts_a_new_trace(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([]), headers=[(b"traceparent", b"not-a-traceparent")])
    (trace,) = collected(buffer)
    spans = by_name(trace)
    assert trace["trace_id"] != CLIENT_TRACE_ID
    assert spans["POST /v1/chat/completions"]["parent_id"] is None
    assert spans["engine.generate"]["trace_id"] == trace["trace_id"]


async def test_tracestate_is_carried_to_the_deployment(trace_buffer) -> None:
    trace_buffer()
    carriers: list = []
    headers = [(b"traceparent", CLIENT_TRACEPARENT.encode()), (b"tracestate", b"vendor=abc")]
    await call(gateway_app(carriers), headers=headers)
    assert carriers[0]["tracestate"] == "vendor=abc"


async def test_an_engine_failure_marks_every_hop_with_the_troupe_error_code(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([], fail=InferenceFailed("engine crashed")))
    spans = by_name(collected(buffer)[0])
    for name in ("engine.generate", "deployment.stream", "POST /v1/chat/completions"):
        assert spans[name]["status"]["code"] == "ERROR", name
        assert spans[name]["status"]["description"].startswith("INFERENCE_FAILED: engine crashed")
        assert spans[name]["attributes"][ATTR_ERROR_CODE] == "INFERENCE_FAILED"
    assert collected(buffer)[0]["error"] is True


async def test_an_unexpected_exception_is_an_internal_error_naming_its_type(trace_buffer) -> None:
    buffer = trace_buffer()
    with pytest.raises(RuntimeError):
        await call(gateway_app([], fail=RuntimeError("boom")))
    spans = by_name(collected(buffer)[0])
    for name in ("engine.generate", "POST /v1/chat/completions"):
        assert spans[name]["status"]["code"] == "ERROR"
        assert spans[name]["attributes"][ATTR_ERROR_CODE] == "INTERNAL_ERROR"
        assert spans[name]["attributes"]["exception.type"] == "RuntimeError"


async def test_a_5xx_response_marks_the_gateway_span_failed(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([], status=503))
    spans = by_name(collected(buffer)[0])
    assert spans["POST /v1/chat/completions"]["status"] == {"code": "ERROR", "description": "HTTP 503"}
    assert spans["deployment.stream"]["status"]["code"] == "UNSET"


async def test_a_cancelled_stream_ends_its_spans_as_cancelled_not_failed(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([], cancel_after=1))
    spans = by_name(collected(buffer)[0])
    for name in ("engine.generate", "deployment.stream"):
        assert spans[name]["attributes"][ATTR_CANCELLED] is True
        assert spans[name]["status"]["code"] == "UNSET"
    assert spans["engine.generate"]["attributes"][ATTR_OUTPUT_TOKENS] == 1
    assert ATTR_FINISH_REASONS not in spans["engine.generate"]["attributes"]


async def test_closing_after_the_final_chunk_is_not_a_cancellation(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([], cancel_after=3))  # break on the last token, then aclose()
    spans = by_name(collected(buffer)[0])
    assert ATTR_CANCELLED not in spans["engine.generate"]["attributes"]
    assert spans["engine.generate"]["attributes"][ATTR_FINISH_REASONS] == ["stop"]


async def test_client_disconnect_cancels_the_gateway_span(trace_buffer) -> None:
    buffer = trace_buffer()
    started = asyncio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(call(slow_app))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (span,) = collected(buffer)[0]["spans"]
    assert span["attributes"][ATTR_CANCELLED] is True


# ---------------------------------------------------------------- sampling


async def test_ratio_zero_records_nothing_but_still_propagates_the_trace_id(trace_buffer) -> None:
    buffer = trace_buffer(sample_ratio=0.0)
    carriers: list = []
    await call(gateway_app(carriers), headers=[])
    assert collected(buffer) == []
    (carrier,) = carriers
    _version, trace_id, span_id, flags = carrier["traceparent"].split("-")
    assert int(flags, 16) & 0x01 == 0  # the sampled bit is off (0x02 may say "random id")
    assert int(trace_id, 16) != 0 and int(span_id, 16) != 0
    remote = tracing.extract_context(pickle.loads(pickle.dumps(carrier)))
    child = tracing.start_span("deployment.stream", parent=remote)
    assert not child.is_recording()
    assert format(child.get_span_context().trace_id, "032x") == trace_id
    tracing.end_span(child)
    assert collected(buffer) == []


async def test_ratio_zero_still_honors_a_clients_sampled_traceparent(trace_buffer) -> None:
    buffer = trace_buffer(sample_ratio=0.0)
    await call(gateway_app([]))
    (trace,) = collected(buffer)
    assert trace["trace_id"] == CLIENT_TRACE_ID and trace["span_count"] == 3


# ---------------------------------------------------------------- middleware details


async def test_health_and_metrics_are_not_traced(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([]), path="/health")
    await call(gateway_app([]), path="/metrics")
    # No gateway span: the model hop, called with no context, starts traces of its own.
    names = {s["name"] for t in collected(buffer) for s in t["spans"]}
    assert names == {"deployment.stream", "engine.generate"}


async def test_the_span_is_named_by_the_matched_route_template(trace_buffer) -> None:
    buffer = trace_buffer()

    class Route:
        path = "/v1/models/{model_id:path}"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["route"] = Route()  # what Starlette's router sets on a match
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    await call(app, path="/v1/models/mock-small")
    (trace,) = collected(buffer)
    assert trace["root_name"] == "POST /v1/models/{model_id:path}"
    assert trace["spans"][0]["attributes"]["url.path"] == "/v1/models/mock-small"


async def test_a_websocket_makes_the_clients_context_current_without_a_span(trace_buffer) -> None:
    buffer = trace_buffer()
    seen: list = []

    async def ws_app(scope: Any, receive: Any, send: Any) -> None:
        async def one_inference() -> None:  # a WS request task, as websocket.py creates
            with tracing.traced("WS inference", kind=SpanKind.SERVER) as span:
                seen.append(tracing.inject_context(span))

        await asyncio.create_task(one_inference())

    scope = {"type": "websocket", "path": "/ws", "headers": [(b"traceparent", CLIENT_TRACEPARENT.encode())]}
    await TracingMiddleware(ws_app)(scope, None, None)
    (trace,) = collected(buffer)
    assert trace["trace_id"] == CLIENT_TRACE_ID
    assert trace["spans"][0]["parent_id"] == CLIENT_SPAN_ID
    assert seen[0]["traceparent"].startswith(f"00-{CLIENT_TRACE_ID}-")


def test_traced_records_an_error_and_restores_the_outer_context(trace_buffer) -> None:
    buffer = trace_buffer()
    with tracing.traced("outer") as outer:
        with pytest.raises(InferenceFailed), tracing.traced("inner"):
            raise InferenceFailed("bad")
        assert tracing.current_span() is outer
    spans = by_name(collected(buffer)[0])
    assert spans["inner"]["parent_id"] == spans["outer"]["span_id"]
    assert spans["inner"]["status"]["code"] == "ERROR"
    assert spans["outer"]["status"]["code"] == "UNSET"


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


# ---------------------------------------------------------------- TraceBuffer


def span(trace_id: str, span_id: str, parent: Optional[str] = None, start: int = 0, end: int = 0,
         status: str = "UNSET") -> dict[str, Any]:
    return {
        "trace_id": trace_id, "span_id": span_id, "parent_id": parent, "name": f"n-{span_id}",
        "kind": "internal", "start_unix_nano": start, "end_unix_nano": end, "attributes": {},
        "status": {"code": status, "description": None}, "role": "test",
    }


def test_buffer_groups_spans_of_a_trace_arriving_in_separate_batches() -> None:
    buffer = TraceBuffer()
    buffer.add([span("t1", "c", "b", 3_000_000, 4_000_000)])  # engine, from the model replica
    buffer.add([span("t1", "b", "a", 2_000_000, 5_000_000, status="ERROR")])
    buffer.add([span("t1", "a", "client", 1_000_000, 9_000_000)])  # gateway, last to finish
    (trace,) = buffer.recent(5)
    assert trace["root_name"] == "n-a"  # its parent is the client's span, not in the trace
    assert [s["span_id"] for s in trace["spans"]] == ["a", "b", "c"]
    assert trace["duration_ms"] == 8.0 and trace["start"] == pytest.approx(0.001)
    assert trace["error"] is True and trace["span_count"] == 3


def test_buffer_keeps_the_newest_traces_and_evicts_the_oldest() -> None:
    buffer = TraceBuffer(max_traces=3)
    for i in range(5):
        buffer.add([span(f"t{i}", "s", start=i, end=i + 1)])
    assert [t["trace_id"] for t in buffer.recent(10)] == ["t4", "t3", "t2"]
    assert buffer.evicted_traces == 2 and len(buffer) == 3
    buffer.add([span("t2", "late")])  # a late span makes its trace the newest again
    assert [t["trace_id"] for t in buffer.recent(2)] == ["t2", "t4"]
    assert buffer.recent(0) == []


def test_buffer_bounds_spans_per_trace() -> None:
    buffer = TraceBuffer(max_spans_per_trace=4)
    buffer.add([span("t", f"s{i}", start=i, end=i) for i in range(10)])
    (trace,) = buffer.recent(1)
    assert trace["span_count"] == 4 and trace["dropped_spans"] == 6
    assert [s["span_id"] for s in trace["spans"]] == ["s0", "s1", "s2", "s3"]


def test_buffer_rejects_malformed_spans_and_invalid_bounds() -> None:
    buffer = TraceBuffer()
    buffer.add([{"span_id": "x"}, "nonsense", span("t", "ok")])  # type: ignore[list-item]
    assert buffer.rejected_spans == 2 and len(buffer) == 1
    with pytest.raises(ValueError):
        TraceBuffer(max_traces=0)


def test_recent_returns_copies_the_caller_may_change() -> None:
    buffer = TraceBuffer()
    buffer.add([span("t", "a")])
    buffer.recent(1)[0]["spans"].clear()
    assert buffer.recent(1)[0]["span_count"] == 1


# ---------------------------------------------------------------- cost


def _per_call_us(fn: Callable[[], Any], n: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def test_disabled_tracing_costs_almost_nothing(trace_buffer) -> None:
    buffer = trace_buffer(enabled=False)
    assert not tracing.tracing_enabled()
    carrier = {"traceparent": CLIENT_TRACEPARENT}
    headers = [(b"traceparent", CLIENT_TRACEPARENT.encode())]
    off_span = tracing.start_span("x")
    assert off_span is tracing.INVALID_SPAN and tracing.inject_context() is None

    def in_block() -> None:
        with tracing.traced("x"):
            pass

    costs = {
        "start_span": _per_call_us(lambda: tracing.start_span("x", kind=SpanKind.SERVER), 100_000),
        "end_span": _per_call_us(lambda: tracing.end_span(off_span), 100_000),
        "inject_context": _per_call_us(tracing.inject_context, 100_000),
        "extract_context": _per_call_us(lambda: tracing.extract_context(carrier), 100_000),
        "context_from_headers": _per_call_us(lambda: tracing.context_from_headers(headers), 100_000),
        "traced": _per_call_us(in_block, 100_000),
    }
    print("\ndisabled path, us per call:", {k: round(v, 3) for k, v in costs.items()})
    assert all(cost < 5.0 for cost in costs.values()), costs
    assert collected(buffer) == []


def test_enabled_cost_per_request(trace_buffer) -> None:
    """Three spans + inject + pickle + extract, the gateway-to-engine path; reported."""
    trace_buffer()
    headers = [(b"host", b"gw"), (b"traceparent", CLIENT_TRACEPARENT.encode())]

    def one_request() -> None:
        gateway = tracing.start_span(
            "POST /v1/chat/completions", parent=tracing.context_from_headers(headers),
            kind=SpanKind.SERVER, attributes={ATTR_REQUEST_ID: "req_1"},
        )
        carrier = pickle.loads(pickle.dumps(tracing.inject_context(gateway)))
        deployment = tracing.start_span(
            "deployment.stream", parent=tracing.extract_context(carrier), kind=SpanKind.SERVER,
            attributes={ATTR_MODEL: "m", ATTR_REQUEST_ID: "req_1"},
        )
        engine = tracing.start_span("engine.generate", parent=deployment, attributes={ATTR_MODEL: "m"})
        tracing.end_span(engine, None, {ATTR_INPUT_TOKENS: 7, ATTR_OUTPUT_TOKENS: 16,
                                        ATTR_FINISH_REASONS: ("stop",)})
        tracing.end_span(deployment)
        tracing.end_span(gateway)

    cost = _per_call_us(one_request, 5_000)
    tracing.flush_tracing()
    print(f"\nenabled path: {cost:.1f} us per request (3 spans + inject/extract)")
    assert cost < 2_000  # a request through Serve costs milliseconds; this must stay far below


def test_the_modules_import_neither_ray_nor_torch() -> None:
    code = (
        "import sys, serve_app.tracing, actors.traces; "
        "bad = [m for m in ('ray', 'torch') if m in sys.modules]; "
        "assert not bad, bad; "
        "missing = [n for n in serve_app.tracing.__all__ if not hasattr(serve_app.tracing, n)]; "
        "assert not missing, missing"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

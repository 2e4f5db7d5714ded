"""Tracing through the real gateway app and LLMDeployment (fake handles, no Ray).

One chat request -> one trace: the gateway's SERVER span (child of the client's
traceparent) -> "deployment.stream" -> "engine.generate", the context crossing the fake
handle inside a pickled GenerationRequest, as over a Ray handle.
"""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from actors.traces import TraceBuffer
from serve_app import tracing
from serve_app.tracing import TracingSettings
from tests.unit.gateway_fakes import GatewayUnderTest, chat_body, sse_json

CLIENT_TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN_ID = "b7ad6b7169203331"
HEADERS = {"traceparent": f"00-{CLIENT_TRACE_ID}-{CLIENT_SPAN_ID}-01"}


@pytest.fixture
def buffer() -> Iterator[TraceBuffer]:
    traces = TraceBuffer()
    tracing.setup_tracing(TracingSettings(otlp_endpoint=None), "test", traces.add)
    yield traces
    tracing.shutdown_tracing()


def only_trace(buffer: TraceBuffer) -> dict[str, Any]:
    assert tracing.flush_tracing(5.0)
    (trace,) = buffer.recent(10)
    return trace


def assert_connected(trace: dict[str, Any], root: str) -> dict[str, dict[str, Any]]:
    spans = {s["name"]: s for s in trace["spans"]}
    assert set(spans) == {root, "deployment.stream", "engine.generate"}
    assert trace["trace_id"] == CLIENT_TRACE_ID and trace["root_name"] == root
    assert spans[root]["parent_id"] == CLIENT_SPAN_ID
    assert spans["deployment.stream"]["parent_id"] == spans[root]["span_id"]
    assert spans["engine.generate"]["parent_id"] == spans["deployment.stream"]["span_id"]
    return spans


@pytest.mark.parametrize("stream", [False, True])
async def test_one_chat_request_is_one_connected_trace(gw: GatewayUnderTest, buffer, stream) -> None:
    r = await gw.post("/v1/chat/completions", json=chat_body(stream=stream), headers=HEADERS)
    assert r.status_code == 200
    spans = assert_connected(only_trace(buffer), "POST /v1/chat/completions")
    engine = spans["engine.generate"]["attributes"]
    assert engine["gen_ai.request.model"] == "mock-fast"
    assert engine["troupe.request_id"] == r.headers["x-request-id"]
    assert engine["gen_ai.usage.output_tokens"] > 0 and engine["gen_ai.usage.input_tokens"] > 0
    assert engine["gen_ai.response.finish_reasons"] in (["stop"], ["length"])
    gateway = spans["POST /v1/chat/completions"]["attributes"]
    assert gateway["http.response.status_code"] == 200
    assert gateway["troupe.request_id"] == r.headers["x-request-id"]


async def test_a_mid_stream_engine_failure_is_an_error_at_every_hop(gw: GatewayUnderTest, buffer) -> None:
    r = await gw.post("/v1/chat/completions", json=chat_body(model="mock-broken", stream=True),
                      headers=HEADERS)
    assert r.status_code == 200  # the error came after the stream started
    assert any("error" in e for e in sse_json(r)[0])
    spans = assert_connected(only_trace(buffer), "POST /v1/chat/completions")
    for span in spans.values():
        assert span["status"]["code"] == "ERROR"
        assert span["attributes"]["troupe.error.code"] == "INFERENCE_FAILED"


async def test_a_rejected_request_has_only_the_gateway_span_with_its_code(gw: GatewayUnderTest, buffer) -> None:
    r = await gw.post("/v1/chat/completions", json=chat_body(model="nope"), headers=HEADERS)
    assert r.status_code == 404
    (span,) = only_trace(buffer)["spans"]
    assert span["attributes"]["troupe.error.code"] == "MODEL_NOT_FOUND"
    assert span["attributes"]["http.response.status_code"] == 404


async def test_native_stream_is_traced_too(gw: GatewayUnderTest, buffer) -> None:
    r = await gw.post("/inference/stream", json={"model": "mock-fast", "prompt": "hi"}, headers=HEADERS)
    assert r.status_code == 200
    assert_connected(only_trace(buffer), "POST /inference/stream")


async def test_health_is_not_traced(gw: GatewayUnderTest, buffer) -> None:
    await gw.get("/health")
    assert tracing.flush_tracing(5.0) and len(buffer) == 0


async def test_tracing_off_sends_no_context(gw: GatewayUnderTest) -> None:
    tracing.setup_tracing(TracingSettings(enabled=False), "test")
    try:
        assert tracing.inject_context() is None
        r = await gw.post("/v1/chat/completions", json=chat_body(), headers=HEADERS)
        assert r.status_code == 200
    finally:
        tracing.shutdown_tracing()

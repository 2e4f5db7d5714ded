"""The gateway's streams over in-process HTTP with fake model handles (see gateway_fakes):
failures mid-stream and before the first token, the native stream's event format."""

from __future__ import annotations

import asyncio
import json

from tests.unit.gateway_fakes import (
    GatewayUnderTest,
    assert_native_error,
    assert_openai_error,
    chat_body,
    eventually,
    sse_events,
    sse_json,
)


# ---------------------------------------------------------- mid-stream failures


async def test_mid_stream_failure_ends_with_an_openai_error_event_then_done(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/v1/chat/completions", json={**chat_body(max_tokens=20, stream=True), "model": "mock-broken"}
    )
    assert response.status_code == 200
    events, raw = sse_json(response)

    assert raw[-1] == "[DONE]"
    error = events[-1]
    assert set(error) == {"error"}
    assert error["error"]["code"] == "inference_failed"
    assert error["error"]["type"] == "server_error"
    assert error["error"]["request_id"] == response.headers["x-request-id"]
    assert "mock-broken" in error["error"]["message"]
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1])
    assert len(content.split()) == 2  # the two tokens before the failure were delivered
    await eventually(lambda: gw.active("mock-broken") == 0)


async def test_mid_stream_failure_on_completions(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/v1/completions",
        json={"model": "mock-broken", "prompt": "x", "max_tokens": 20, "stream": True},
    )
    assert response.status_code == 200
    events, raw = sse_json(response)
    assert raw[-1] == "[DONE]"
    assert events[-1]["error"]["code"] == "inference_failed"


async def test_mid_stream_failure_on_native_stream_is_an_error_event(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/inference/stream", json={"model": "mock-broken", "prompt": "x", "max_tokens": 20}
    )
    assert response.status_code == 200
    events = sse_events(response)

    assert events[-1]["event"] == "error"
    body = json.loads(events[-1]["data"])
    assert set(body) == {"error", "request_id", "timestamp"}
    assert body["error"]["code"] == "INFERENCE_FAILED"
    assert body["request_id"] == response.headers["x-request-id"]
    tokens = [json.loads(e["data"]) for e in events[:-1]]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    assert not any(t.get("done") for t in tokens)


async def test_failure_before_the_first_token_is_a_500_not_a_stream(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/v1/chat/completions", json={**chat_body(stream=True), "model": "mock-dead"}
    )
    err = assert_openai_error(response, 500, "inference_failed")
    assert "RuntimeError" in err["message"]
    native = await gw.post("/inference", json={"model": "mock-dead", "prompt": "x"})
    assert_native_error(native, 500, "INFERENCE_FAILED")
    native_stream = await gw.post("/inference/stream", json={"model": "mock-dead", "prompt": "x"})
    assert_native_error(native_stream, 500, "INFERENCE_FAILED")


# -------------------------------------------------------------- native stream


async def test_native_stream_event_format(gw: GatewayUnderTest) -> None:
    body = {"model": "mock-fast", "prompt": "Hello", "max_tokens": 12, "temperature": 0}
    plain = (await gw.post("/inference", json=body)).json()
    response = await gw.post("/inference/stream", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(e["data"]) for e in sse_events(response)]

    *tokens, done = events
    assert tokens
    assert all(set(t) == {"token", "index"} for t in tokens)
    indexes = [t["index"] for t in tokens]
    assert indexes == sorted(indexes) and indexes[0] == 0
    assert "".join(t["token"] for t in tokens) == plain["text"]
    assert done == {"done": True, "finish_reason": plain["finish_reason"], "usage": plain["usage"]}


async def test_native_stream_index_counts_tokens_with_merged_deltas(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/inference/stream", json={"model": "mock-merge", "prompt": "Hello", "max_tokens": 30}
    )
    *tokens, done = [json.loads(e["data"]) for e in sse_events(response)]

    # Each mock token is one word, so a delta's token count is its word count.
    counts = [len(t["token"].split()) for t in tokens]
    assert max(counts) > 1, "the slow link should have merged some tokens"
    assert [t["index"] for t in tokens] == [sum(counts[:i]) for i in range(len(tokens))]
    assert done["usage"]["completion_tokens"] == 30 == sum(counts)
    assert done["finish_reason"] == "length"


async def test_engine_abort_reaches_the_native_stream_as_cancelled(gw: GatewayUnderTest) -> None:
    body = {"model": "mock-slow", "prompt": "Hello", "max_tokens": 1500}
    inflight = asyncio.ensure_future(gw.post("/inference/stream", json=body))
    await eventually(lambda: gw.active("mock-slow") == 1)

    await gw.deployments["mock-slow"].engine.shutdown()  # aborts every running request
    response = await inflight

    *tokens, done = [json.loads(e["data"]) for e in sse_events(response)]
    assert done["done"] is True
    assert done["finish_reason"] == "cancelled"
    # The abort may land before the first token; whatever was sent is counted exactly.
    sent = sum(len(t["token"].split()) for t in tokens)
    assert done["usage"]["completion_tokens"] == sent < 1500
    assert gw.active("mock-slow") == 0

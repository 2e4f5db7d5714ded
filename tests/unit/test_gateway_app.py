"""The gateway's routes over in-process HTTP with fake model handles (see gateway_fakes)."""

from __future__ import annotations

import asyncio
import json
from typing import Any
import pytest

from tests.unit.gateway_fakes import (
    GatewayUnderTest,
    MODELS,
    assert_native_error,
    assert_openai_error,
    chat_body,
    eventually,
    make_gateway,
    sse_events,
    sse_json,
)


# ------------------------------------------------------------------------ models


async def test_list_models(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [m["id"] for m in MODELS]
    assert all(m["object"] == "model" and m["owned_by"] == "troupe" for m in body["data"])


async def test_get_one_model(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/models/mock-fast")
    assert response.status_code == 200
    assert response.json()["id"] == "mock-fast"


async def test_get_unknown_model_is_a_404_envelope(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/models/gpt-nope")
    err = assert_openai_error(response, 404, "model_not_found")
    assert err["type"] == "not_found_error"
    assert err["param"] == "model"
    assert "mock-fast" in err["message"]  # says which models exist


async def test_chat_with_unknown_model_is_404(gw: GatewayUnderTest) -> None:
    response = await gw.post("/v1/chat/completions", json={**chat_body(), "model": "nope"})
    assert_openai_error(response, 404, "model_not_found")


# -------------------------------------------------------------------------- chat


async def test_chat_completion(gw: GatewayUnderTest) -> None:
    response = await gw.post("/v1/chat/completions", json=chat_body(max_tokens=20))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "mock-fast"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 < usage["completion_tokens"] <= 20
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_chat_max_completion_tokens_wins_over_max_tokens(gw: GatewayUnderTest) -> None:
    body = {**chat_body(), "model": "mock-slow", "max_tokens": 9, "max_completion_tokens": 3}
    response = await gw.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3


async def test_chat_stream(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/v1/chat/completions",
        json=chat_body(max_tokens=20, stream=True, stream_options={"include_usage": True}),
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks, raw = sse_json(response)

    assert raw[-1] == "[DONE]"
    assert raw.count("[DONE]") == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    *content, finish, usage_chunk = chunks
    content = content[1:]
    # The last text rides with the finish reason (as vLLM does); earlier chunks have none.
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content + [finish])
    assert text, "the stream carried text"
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert 0 < usage["completion_tokens"] <= 20
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_chat_stream_without_include_usage_has_no_usage(gw: GatewayUnderTest) -> None:
    response = await gw.post("/v1/chat/completions", json=chat_body(max_tokens=5, stream=True))
    chunks, raw = sse_json(response)
    assert raw[-1] == "[DONE]"
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_stream_text_equals_non_stream_text_at_temperature_zero(gw: GatewayUnderTest) -> None:
    body = chat_body("Describe the weather", max_tokens=30, temperature=0)
    plain = (await gw.post("/v1/chat/completions", json=body)).json()
    streamed = await gw.post("/v1/chat/completions", json={**body, "stream": True})
    chunks, _ = sse_json(streamed)

    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


async def test_same_seed_gives_same_answer(gw: GatewayUnderTest) -> None:
    body = chat_body("Pick a word", max_tokens=10, temperature=1.0, seed=42)
    a = (await gw.post("/v1/chat/completions", json=body)).json()
    b = (await gw.post("/v1/chat/completions", json=body)).json()
    c = (await gw.post("/v1/chat/completions", json={**body, "seed": 43})).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["choices"][0]["message"] != c["choices"][0]["message"]


async def test_chat_with_text_content_parts(gw: GatewayUnderTest) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    body = {"model": "mock-fast", "messages": [{"role": "user", "content": parts}], "max_tokens": 5}
    response = await gw.post("/v1/chat/completions", json=body)
    assert response.status_code == 200


async def test_stop_string_trims_the_answer(gw: GatewayUnderTest) -> None:
    body = chat_body("Say things", max_tokens=30, temperature=0)
    full = (await gw.post("/v1/chat/completions", json=body)).json()
    text = full["choices"][0]["message"]["content"]
    stop = text.split()[2]
    response = await gw.post("/v1/chat/completions", json={**body, "stop": [stop]})
    trimmed = response.json()["choices"][0]
    assert trimmed["message"]["content"] == text[: text.find(stop)]
    assert trimmed["finish_reason"] == "stop"


# -------------------------------------------------------------------- completions


async def test_completion(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/v1/completions", json={"model": "mock-fast", "prompt": "Once upon", "max_tokens": 10}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= 10


async def test_completion_echo_and_single_item_prompt_list(gw: GatewayUnderTest) -> None:
    body = {"model": "mock-fast", "prompt": ["Once upon"], "max_tokens": 5, "temperature": 0}
    plain = (await gw.post("/v1/completions", json=body)).json()
    echoed = (await gw.post("/v1/completions", json={**body, "echo": True})).json()
    assert echoed["choices"][0]["text"] == "Once upon" + plain["choices"][0]["text"]


async def test_completion_stream_matches_non_stream(gw: GatewayUnderTest) -> None:
    body = {"model": "mock-fast", "prompt": "Once upon", "max_tokens": 12, "temperature": 0}
    plain = (await gw.post("/v1/completions", json=body)).json()
    response = await gw.post(
        "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert response.status_code == 200
    chunks, raw = sse_json(response)

    assert raw[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in chunks)
    *text_chunks, usage_chunk = chunks
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == plain["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == plain["usage"]


async def test_completion_with_several_prompts_has_a_choice_per_prompt(gw: GatewayUnderTest) -> None:
    response = await gw.post("/v1/completions", json={"model": "mock-fast", "prompt": ["a", "b"]})
    assert response.status_code == 200
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and all(c["text"] for c in choices)


# ------------------------------------------------------------ request identity


async def test_every_response_carries_a_request_id(gw: GatewayUnderTest) -> None:
    responses = [
        await gw.get("/v1/models"),
        await gw.get("/health"),
        await gw.post("/v1/chat/completions", json=chat_body(max_tokens=2)),
        await gw.post("/v1/chat/completions", json=chat_body(max_tokens=2, stream=True)),
        await gw.post("/v1/chat/completions", content=b"{"),
        await gw.get("/nowhere"),
        await gw.request("DELETE", "/v1/models"),
        await gw.post("/inference", json={"model": "nope", "prompt": "x"}),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(i and i.startswith("req_") for i in ids), ids
    assert len(set(ids)) == len(ids)


async def test_client_request_id_is_echoed_but_not_used_as_ours(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/v1/chat/completions",
        json=chat_body(max_tokens=2),
        headers={"X-Client-Request-Id": "my-trace-123"},
    )
    assert response.headers["x-client-request-id"] == "my-trace-123"
    assert response.headers["x-request-id"] != "my-trace-123"
    error = await gw.get("/v1/models/nope", headers={"X-Client-Request-Id": "my-trace-456"})
    assert error.headers["x-client-request-id"] == "my-trace-456"


async def test_a_client_sent_x_request_id_does_not_remove_ours(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/models/nope", headers={"x-request-id": "chosen-by-client"})
    assert response.status_code == 404
    assert response.headers.get("x-request-id", "").startswith("req_")
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


async def test_native_inference_ids_match_the_header(gw: GatewayUnderTest) -> None:
    response = await gw.post("/inference", json={"model": "mock-fast", "prompt": "hi", "max_tokens": 4})
    assert response.status_code == 200
    body = response.json()
    assert body["request_id"] == body["id"] == response.headers["x-request-id"]
    assert body["text"]
    assert body["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


# ---------------------------------------------------------------- unknown fields


async def test_unknown_request_fields_are_accepted(gw: GatewayUnderTest, caplog) -> None:
    caplog.set_level("INFO", logger="troupe.gateway")
    body = chat_body(max_tokens=3, frequency_penalty=0.5, brand_new_field={"x": 1})
    body["messages"][0]["some_future_field"] = True
    response = await gw.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert "brand_new_field" in caplog.text
    native = await gw.post(
        "/inference", json={"model": "mock-fast", "prompt": "x", "max_tokens": 2, "extra_knob": 1}
    )
    assert native.status_code == 200


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


# --------------------------------------------------------------- health, cancel


async def test_health_reports_models_idle(gw: GatewayUnderTest) -> None:
    response = await gw.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["models_loaded"] == len(MODELS)
    by_id = {m["id"]: m for m in body["models"]}
    assert set(by_id) == {m["id"] for m in MODELS}
    assert all(m["active_requests"] == 0 and m["loaded"] for m in by_id.values())


async def test_health_shows_engine_side_active_requests_and_cancel_frees_them(gw: GatewayUnderTest) -> None:
    slow = {"model": "mock-slow", "messages": [{"role": "user", "content": "go"}], "max_tokens": 1500}
    inflight = asyncio.ensure_future(gw.client.post("/v1/chat/completions", json=slow))
    try:
        await eventually(lambda: gw.active("mock-slow") == 1)

        health = (await gw.get("/health")).json()
        by_id = {m["id"]: m for m in health["models"]}
        assert by_id["mock-slow"]["active_requests"] == 1
        assert by_id["mock-fast"]["active_requests"] == 0
        assert health["in_flight_requests"] == 1
    finally:
        inflight.cancel()  # the client goes away mid-request
    with pytest.raises(asyncio.CancelledError):
        await inflight

    # The gateway cancelled the remote call, and the engine freed the slot.
    await eventually(lambda: gw.active("mock-slow") == 0)
    assert any(getattr(r, "cancelled", False) for r in gw.replicas["mock-slow"].responses)
    assert gw.core.in_flight == 0


async def test_native_models_lists_loaded_state_and_resources(gw: GatewayUnderTest) -> None:
    response = await gw.get("/models")
    assert response.status_code == 200
    data = {m["id"]: m for m in response.json()["models"]}
    fast = data["mock-fast"]
    assert fast["loaded"] is True
    assert fast["engine"] == "mock"
    assert "streaming" in fast["capabilities"]
    assert fast["context_length"] == 4096
    assert fast["default_max_tokens"] == 64
    assert fast["resources"]["max_ongoing_requests"] == 30


async def test_in_flight_returns_to_zero_after_streams(gw: GatewayUnderTest) -> None:
    await gw.post("/v1/chat/completions", json=chat_body(max_tokens=5, stream=True))
    await gw.post("/inference/stream", json={"model": "mock-fast", "prompt": "x", "max_tokens": 5})
    await gw.post("/v1/chat/completions", json={**chat_body(stream=True), "model": "mock-broken"})
    assert gw.core.in_flight == 0
    await eventually(lambda: all(gw.active(m["id"]) == 0 for m in MODELS))


async def test_model_ids_with_a_slash_are_routable(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/models/org/mock")
    assert response.status_code == 200
    assert response.json()["id"] == "org/mock"
    chat = await gw.post("/v1/chat/completions", json={**chat_body(max_tokens=3), "model": "org/mock"})
    assert chat.status_code == 200


async def test_client_disconnect_mid_stream_aborts_the_engine(gw: GatewayUnderTest) -> None:
    body = {**chat_body(max_tokens=1500, stream=True), "model": "mock-slow"}
    inflight = asyncio.ensure_future(gw.client.post("/v1/chat/completions", json=body))
    await eventually(lambda: gw.active("mock-slow") == 1)

    inflight.cancel()  # the client goes away while tokens are streaming
    with pytest.raises(asyncio.CancelledError):
        await inflight

    await eventually(lambda: gw.active("mock-slow") == 0)
    assert any(getattr(r, "cancelled", False) for r in gw.replicas["mock-slow"].responses)
    assert gw.core.in_flight == 0


async def test_health_is_degraded_when_a_replica_does_not_answer(gw: GatewayUnderTest) -> None:
    gw.replicas["mock-fast"].stats_failure = RuntimeError("replica died")
    gw.replicas["mock-slow"].stats_failure = "hang"

    response = await gw.get("/health")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    by_id = {m["id"]: m for m in body["models"]}
    assert by_id["mock-fast"]["loaded"] is False
    assert by_id["mock-fast"]["reason"] == "RuntimeError"
    assert by_id["mock-slow"]["status"] == "unavailable"
    assert "no answer" in by_id["mock-slow"]["reason"]
    assert by_id["mock-broken"]["loaded"] is True
    assert body["models_loaded"] == len(MODELS) - 2


async def test_total_timeout_is_504_and_stops_the_engine() -> None:
    gateway = make_gateway(request_timeout_s=0.1)
    try:
        response = await gateway.post(
            "/v1/chat/completions", json={**chat_body(max_tokens=1500), "model": "mock-slow"}
        )
        err = assert_openai_error(response, 504, "timeout")
        assert err["type"] == "timeout_error"
        await eventually(lambda: gateway.active("mock-slow") == 0)
    finally:
        await gateway.client.aclose()


async def test_idle_stream_timeout_mid_stream_is_a_final_error_event() -> None:
    gateway = make_gateway(stream_idle_timeout_s=0.05)
    # The link to mock-merge stalls for longer than the idle timeout after the first chunk.
    gateway.replicas["mock-merge"].reader_delay_s = 0.3
    try:
        response = await gateway.post(
            "/v1/chat/completions",
            json={**chat_body(max_tokens=50, stream=True), "model": "mock-merge"},
        )
        assert response.status_code == 200
        events, raw = sse_json(response)
        assert raw[-1] == "[DONE]"
        assert events[-1]["error"]["code"] == "timeout"
        await eventually(lambda: gateway.active("mock-merge") == 0)
    finally:
        await gateway.client.aclose()


def _ray_failures() -> list[Any]:
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    return [
        pytest.param(
            serve_exc.BackPressureError(num_queued_requests=9, max_queued_requests=8),
            429, "overloaded", "1", id="queue-full",
        ),
        pytest.param(
            serve_exc.DeploymentUnavailableError("LLM_mock-fast"),
            503, "overloaded", "5", id="no-replica",
        ),
        pytest.param(
            ray_exc.ActorUnavailableError("replica died", None),
            500, "inference_failed", None, id="replica-died",
        ),
        pytest.param(
            ValueError("internal detail: /srv/secret"),
            500, "internal_error", None, id="unexpected",
        ),
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("failure", "status", "code", "retry_after"), _ray_failures())
async def test_handle_failures_map_to_named_errors(
    gw: GatewayUnderTest, failure: BaseException, status: int, code: str, retry_after, stream: bool
) -> None:
    gw.replicas["mock-fast"].call_failure = failure
    response = await gw.post("/v1/chat/completions", json=chat_body(stream=stream))

    assert_openai_error(response, status, code)
    assert response.headers.get("retry-after") == retry_after
    assert "/srv/secret" not in response.text
    assert gw.core.in_flight == 0

"""``POST /v1/messages`` (Anthropic shape) over in-process HTTP with fake model handles."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from serve_app.errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    InferenceFailed,
    InvalidRequest,
    ModelNotFound,
    ModelNotLoaded,
    Overloaded,
    RateLimitExceeded,
    RequestTooLarge,
    Timeout,
    anthropic_error_body,
)
from serve_app.protocol.metrics import RequestEvent
from tests.unit.gateway_fakes import GatewayUnderTest, eventually, sse_events

USER = [{"role": "user", "content": "Tell me about actors"}]
HEADERS = {"x-api-key": "sk-ant-anything", "anthropic-version": "2023-06-01"}


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "mock-fast", "max_tokens": 200, "messages": USER, **extra}


async def post(gw: GatewayUnderTest, payload: Any, **kwargs: Any) -> httpx.Response:
    return await gw.post("/v1/messages", json=payload, headers=HEADERS, **kwargs)


def assert_anthropic_error(r: httpx.Response, status: int, error_type: str) -> str:
    assert r.status_code == status, r.text
    payload = r.json()
    assert set(payload) == {"type", "error", "request_id"}
    assert payload["type"] == "error"
    assert set(payload["error"]) == {"type", "message"}
    assert payload["error"]["type"] == error_type
    assert payload["request_id"] == r.headers["x-request-id"]
    return payload["error"]["message"]


def events_of(r: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for event in sse_events(r):
        payload = json.loads(event["data"])
        assert payload["type"] == event["event"]
        out.append((event["event"], payload))
    return out


# --------------------------------------------------------------------- unary


async def test_message_object_shape_and_usage(gw: GatewayUnderTest) -> None:
    r = await post(gw, body())
    assert r.status_code == 200, r.text
    msg = r.json()
    assert msg["id"].startswith("msg_") and msg["type"] == "message"
    assert msg["role"] == "assistant" and msg["model"] == "mock-fast"
    [block] = msg["content"]
    assert block["type"] == "text" and block["text"]
    assert msg["stop_reason"] == "end_turn" and msg["stop_sequence"] is None
    assert msg["usage"]["input_tokens"] > 0
    assert msg["usage"]["output_tokens"] == len(block["text"].split())


async def test_max_tokens_hit_is_stop_reason_max_tokens(gw: GatewayUnderTest) -> None:
    r = await post(gw, body(model="mock-slow", max_tokens=6))
    msg = r.json()
    assert msg["stop_reason"] == "max_tokens" and msg["usage"]["output_tokens"] == 6
    assert len(msg["content"][0]["text"].split()) == 6


async def test_system_and_text_blocks_reach_the_model(gw: GatewayUnderTest) -> None:
    plain = (await post(gw, body(temperature=0))).json()
    as_blocks = (await post(gw, body(
        temperature=0,
        messages=[{"role": "user", "content": [{"type": "text", "text": "Tell me about actors"}]}],
    ))).json()
    with_system = (await post(gw, body(temperature=0, system="You are terse."))).json()
    system_blocks = (await post(gw, body(
        temperature=0, system=[{"type": "text", "text": "You are terse."}]))).json()
    assert as_blocks["content"] == plain["content"]  # a string and one text block are the same
    assert system_blocks["content"] == with_system["content"]
    assert with_system["usage"]["input_tokens"] > plain["usage"]["input_tokens"]
    assert with_system["content"] != plain["content"]


async def test_multi_turn_and_consecutive_user_turns(gw: GatewayUnderTest) -> None:
    turns = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Tell me"},
        {"role": "user", "content": [{"type": "text", "text": "about actors"}]},
    ]
    r = await post(gw, body(messages=turns, top_k=40, metadata={"user_id": "u1"},
                            output_config={"effort": "low"}, service_tier="auto"))
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens"] > 4


async def test_stop_sequence_trims_the_answer_and_is_reported(gw: GatewayUnderTest) -> None:
    full = (await post(gw, body(model="mock-slow", max_tokens=10, temperature=0))).json()
    words = full["content"][0]["text"].split()
    stops = ["never-in-the-text", " " + words[3]]
    stopped = (await post(gw, body(model="mock-slow", max_tokens=10, temperature=0,
                                   stop_sequences=stops))).json()
    assert stopped["content"][0]["text"] == " ".join(words[:3])
    assert stopped["stop_reason"] == "stop_sequence"
    assert stopped["stop_sequence"] == " " + words[3]
    r = await post(gw, body(model="mock-slow", max_tokens=10, temperature=0,
                            stop_sequences=stops, stream=True))
    final = events_of(r)[-2][1]
    assert final["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": " " + words[3]}
    # Without a stop string hit, a natural end is end_turn with no stop_sequence.
    natural = (await post(gw, body(stop_sequences=["never-in-the-text"]))).json()
    assert (natural["stop_reason"], natural["stop_sequence"]) == ("end_turn", None)


# ------------------------------------------------------------------- streams


async def test_stream_event_sequence(gw: GatewayUnderTest) -> None:
    unary = (await post(gw, body(temperature=0))).json()
    r = await post(gw, body(temperature=0, stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r)
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == []
    assert start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == unary["usage"]["input_tokens"]
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    deltas = [p["delta"] for n, p in events if n == "content_block_delta"]
    assert all(d["type"] == "text_delta" for d in deltas)
    assert "".join(d["text"] for d in deltas) == unary["content"][0]["text"]
    final = events[-2][1]
    assert final["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert final["usage"]["output_tokens"] == unary["usage"]["output_tokens"]


async def test_stream_that_hits_max_tokens(gw: GatewayUnderTest) -> None:
    r = await post(gw, body(model="mock-merge", max_tokens=7, stream=True))
    events = events_of(r)
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    assert events[-2][1]["usage"]["output_tokens"] == 7


async def test_mid_stream_failure_is_an_error_event(gw: GatewayUnderTest) -> None:
    r = await post(gw, body(model="mock-broken", max_tokens=20, stream=True))
    assert r.status_code == 200
    events = events_of(r)
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-1] == "error" and "message_stop" not in names
    err = events[-1][1]
    assert err["error"]["type"] == "api_error" and "mock-broken" in err["error"]["message"]
    assert err["request_id"] == r.headers["x-request-id"]
    text = "".join(p["delta"]["text"] for n, p in events if n == "content_block_delta")
    assert len(text.split()) == 2
    await eventually(lambda: gw.active("mock-broken") == 0)


async def test_failure_before_the_first_token_is_a_500_in_anthropic_envelope(gw: GatewayUnderTest) -> None:
    r = await post(gw, body(model="mock-dead", stream=True))
    assert_anthropic_error(r, 500, "api_error")


async def test_client_disconnect_mid_stream_aborts_the_engine(gw: GatewayUnderTest) -> None:
    inflight = asyncio.ensure_future(post(gw, body(model="mock-slow", max_tokens=1500, stream=True)))
    await eventually(lambda: gw.active("mock-slow") == 1)
    inflight.cancel()
    with pytest.raises(asyncio.CancelledError):
        await inflight
    await eventually(lambda: gw.active("mock-slow") == 0)
    assert any(r.cancelled for r in gw.replicas["mock-slow"].responses)
    assert gw.core.in_flight == 0


async def test_requests_are_metered_under_the_route(gw: GatewayUnderTest) -> None:
    recorded: list[RequestEvent] = []
    gw.core.record = recorded.append
    await post(gw, body(max_tokens=3))
    await post(gw, body(max_tokens=3, stream=True))
    await post(gw, {"model": "mock-fast", "messages": USER})
    ok = [e for e in recorded if e.status == 200]
    assert [(e.route, e.stream, e.completion_tokens, e.finish_reason) for e in ok] == [
        ("/v1/messages", False, 3, "length"), ("/v1/messages", True, 3, "length")]
    [rejected] = [e for e in recorded if e.status != 200]
    assert (rejected.route, rejected.error_code) == ("/v1/messages", "INVALID_REQUEST")


# ----------------------------------------------------------------- bad input


async def test_missing_max_tokens_is_a_400_naming_it(gw: GatewayUnderTest) -> None:
    r = await post(gw, {"model": "mock-fast", "messages": USER})
    message = assert_anthropic_error(r, 400, "invalid_request_error")
    assert "max_tokens" in message and "required" in message and '"max_tokens": 64' in message


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (body(messages=[]), "messages: List should have at least 1 item"),
        ({"max_tokens": 5, "messages": USER}, "model: Field required"),
        (body(messages=[{"role": "assistant", "content": "Hi"}, *USER]), "first message must have role 'user'"),
        (body(messages=[*USER, {"role": "assistant", "content": "Sure"}]), "last message must have role 'user'"),
        (body(messages=[{"role": "system", "content": "x"}, *USER]), "messages.0.role"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
         "source.type"),
        (body(messages=[{"role": "user", "content": []}]), "non-empty"),
        (body(messages=[{"role": "user", "content": 5}]), "messages.0.content"),
        (body(messages="hello"), "messages"),
        (body(max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
        (body(max_tokens="many"), "max_tokens"),
        (body(temperature=1.5), "temperature: Input should be less than or equal to 1"),
        (body(stop_sequences=[""]), "stop sequences must be non-empty"),
        (body(system=[{"type": "image"}]), "system block 0"),
        (body(tools=[{"name": "f", "input_schema": {}}]), "input_schema must have type 'object'"),
        (body(thinking={"type": "enabled", "budget_tokens": 1024}), "thinking"),
        (body(output_config={"format": {"type": "xml"}}), "output_config"),
    ],
)
async def test_bad_input_is_a_400_in_anthropic_envelope(
    gw: GatewayUnderTest, payload: dict[str, Any], words: str
) -> None:
    r = await post(gw, payload)
    message = assert_anthropic_error(r, 400, "invalid_request_error")
    assert words in message and "Example of a valid body" in message


@pytest.mark.parametrize("raw", [b"", b"{nope", b"[1, 2]"])
async def test_body_that_is_not_a_json_object_is_a_400(gw: GatewayUnderTest, raw: bytes) -> None:
    r = await gw.post("/v1/messages", content=raw, headers={"content-type": "application/json"})
    assert_anthropic_error(r, 400, "invalid_request_error")


async def test_unknown_model_is_a_404_in_anthropic_envelope(gw: GatewayUnderTest) -> None:
    message = assert_anthropic_error(await post(gw, body(model="claude-nope")), 404, "not_found_error")
    assert "mock-fast" in message  # says what is available


async def test_wrong_method_and_unknown_subpath_use_anthropic_envelope(gw: GatewayUnderTest) -> None:
    assert_anthropic_error(await gw.get("/v1/messages"), 405, "invalid_request_error")
    assert_anthropic_error(await gw.post("/v1/messages/count_tokens", json={}), 404, "not_found_error")


async def test_oversized_body_is_413_request_too_large(gw: GatewayUnderTest) -> None:
    r = await post(gw, body(messages=[{"role": "user", "content": "x" * 5000}]))
    assert_anthropic_error(r, 413, "request_too_large")


@pytest.mark.parametrize(
    ("error", "error_type"),
    [
        (InvalidRequest("x"), "invalid_request_error"),
        (AuthenticationFailed("x"), "authentication_error"),
        (AuthorizationFailed("x"), "permission_error"),
        (ModelNotFound("x"), "not_found_error"),
        (ModelNotLoaded("x"), "invalid_request_error"),
        (RequestTooLarge("x"), "request_too_large"),
        (RateLimitExceeded("x"), "rate_limit_error"),
        (Overloaded("x"), "overloaded_error"),
        (Overloaded("x", status=503), "overloaded_error"),
        (InferenceFailed("x"), "api_error"),
        (Timeout("x"), "timeout_error"),
    ],
)
def test_every_error_kind_has_an_anthropic_type(error, error_type: str) -> None:
    assert anthropic_error_body(error, "req_1") == {
        "type": "error", "error": {"type": error_type, "message": "x"}, "request_id": "req_1"}


async def test_overload_keeps_status_and_retry_after(gw: GatewayUnderTest) -> None:
    from ray.serve import exceptions as serve_exc

    gw.replicas["mock-fast"].call_failure = serve_exc.BackPressureError(
        num_queued_requests=9, max_queued_requests=8)
    for stream in (False, True):
        r = await post(gw, body(stream=stream))
        assert_anthropic_error(r, 429, "overloaded_error")
        assert r.headers["retry-after"] == "1"

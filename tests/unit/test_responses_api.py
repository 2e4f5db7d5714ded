"""``POST /v1/responses`` over in-process HTTP with fake model handles (see gateway_fakes)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from serve_app.protocol.metrics import RequestEvent
from tests.unit.gateway_fakes import (
    GatewayUnderTest,
    assert_openai_error,
    eventually,
    sse_events,
)

ORDER_HEAD = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]
ORDER_TAIL = [
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
]


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "mock-fast", "input": "Tell me about actors", **extra}


def events_of(response) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for event in sse_events(response):
        payload = json.loads(event["data"])
        assert payload["type"] == event["event"]  # the event name repeats the JSON type
        out.append((event["event"], payload))
    return out


def output_text(resp: dict[str, Any]) -> str:
    return "".join(p["text"] for item in resp["output"] for p in item["content"])


# --------------------------------------------------------------------- unary


async def test_response_object_shape_and_usage(gw: GatewayUnderTest) -> None:
    r = await gw.post("/v1/responses", json=body(max_output_tokens=200))
    assert r.status_code == 200, r.text
    resp = r.json()
    assert resp["object"] == "response" and resp["id"].startswith("resp_")
    assert resp["status"] == "completed" and resp["incomplete_details"] is None
    assert resp["model"] == "mock-fast" and isinstance(resp["created_at"], int)
    assert resp["error"] is None and resp["store"] is False
    [item] = resp["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["status"] == "completed" and item["id"].startswith("msg_")
    [part] = item["content"]
    assert part["type"] == "output_text" and part["text"]
    usage = resp["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] == len(part["text"].split())
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


async def test_max_output_tokens_hit_is_incomplete(gw: GatewayUnderTest) -> None:
    r = await gw.post("/v1/responses", json={**body(max_output_tokens=4), "model": "mock-slow"})
    resp = r.json()
    assert resp["status"] == "incomplete"
    assert resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["output"][0]["status"] == "incomplete"
    assert resp["usage"]["output_tokens"] == 4 and len(output_text(resp).split()) == 4


async def test_message_items_parts_and_instructions_reach_the_model(gw: GatewayUnderTest) -> None:
    plain = (await gw.post("/v1/responses", json=body(temperature=0))).json()
    items = [
        {"type": "message", "role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "input_text", "text": "Tell me"},
                                     {"type": "input_text", "text": "about actors"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Sure."}]},
        {"role": "user", "content": "Go on"},
    ]
    rich = (await gw.post("/v1/responses", json=body(
        input=items, instructions="You are a helpful assistant.", temperature=0))).json()
    with_instr = (await gw.post("/v1/responses", json=body(
        instructions="You are a helpful assistant.", temperature=0))).json()
    assert rich["status"] == "completed"
    assert rich["instructions"] == "You are a helpful assistant."
    # Every turn and the instructions are part of the prompt the engine saw.
    assert rich["usage"]["input_tokens"] > with_instr["usage"]["input_tokens"]
    assert with_instr["usage"]["input_tokens"] > plain["usage"]["input_tokens"]
    assert output_text(rich) != output_text(plain)


async def test_store_true_is_accepted_and_nothing_is_stored(gw: GatewayUnderTest) -> None:
    r = await gw.post("/v1/responses", json=body(store=True, max_output_tokens=3,
                                                  metadata={"k": "v"}, reasoning={"effort": "low"}))
    assert r.status_code == 200, r.text
    assert r.json()["store"] is False and r.json()["metadata"] == {"k": "v"}


# ------------------------------------------------------------------- streams


async def test_stream_event_sequence(gw: GatewayUnderTest) -> None:
    unary = (await gw.post("/v1/responses", json=body(temperature=0, max_output_tokens=200))).json()
    r = await gw.post("/v1/responses", json=body(temperature=0, max_output_tokens=200, stream=True))
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = events_of(r)
    names = [name for name, _ in events]
    assert names[:4] == ORDER_HEAD
    assert names[-4:] == [*ORDER_TAIL, "response.completed"]
    deltas = [p for name, p in events if name == "response.output_text.delta"]
    assert len(deltas) == len(names) - 8 and deltas
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    text = "".join(d["delta"] for d in deltas)
    assert text == output_text(unary)
    by_name = dict(events)
    assert by_name["response.created"]["response"]["status"] == "in_progress"
    assert by_name["response.output_text.done"]["text"] == text
    assert by_name["response.content_part.done"]["part"]["text"] == text
    item_id = by_name["response.output_item.added"]["item"]["id"]
    assert all(d["item_id"] == item_id and d["output_index"] == 0 for d in deltas)
    final = by_name["response.completed"]["response"]
    assert final["status"] == "completed" and output_text(final) == text
    assert final["usage"] == unary["usage"]
    assert final["id"] == by_name["response.created"]["response"]["id"]


async def test_stream_that_hits_max_output_tokens_ends_incomplete(gw: GatewayUnderTest) -> None:
    r = await gw.post("/v1/responses", json={**body(max_output_tokens=5, stream=True),
                                             "model": "mock-merge"})
    events = events_of(r)
    name, last = events[-1]
    assert name == "response.incomplete"
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["usage"]["output_tokens"] == 5


async def test_mid_stream_failure_is_an_error_event_then_response_failed(gw: GatewayUnderTest) -> None:
    r = await gw.post("/v1/responses", json={**body(stream=True, max_output_tokens=20),
                                             "model": "mock-broken"})
    assert r.status_code == 200
    events = events_of(r)
    names = [n for n, _ in events]
    assert names[:4] == ORDER_HEAD and names[-2:] == ["error", "response.failed"]
    error, failed = events[-2][1], events[-1][1]["response"]
    assert error["code"] == "inference_failed" and "mock-broken" in error["message"]
    assert failed["status"] == "failed" and failed["error"]["code"] == "inference_failed"
    delivered = "".join(p["delta"] for n, p in events if n == "response.output_text.delta")
    assert len(delivered.split()) == 2 and output_text(failed) == delivered
    assert [p["sequence_number"] for _, p in events] == list(range(len(events)))
    await eventually(lambda: gw.active("mock-broken") == 0)


async def test_failure_before_the_first_token_is_a_500_not_a_stream(gw: GatewayUnderTest) -> None:
    r = await gw.post("/v1/responses", json={**body(stream=True), "model": "mock-dead"})
    assert_openai_error(r, 500, "inference_failed")


async def test_client_disconnect_mid_stream_aborts_the_engine(gw: GatewayUnderTest) -> None:
    inflight = asyncio.ensure_future(gw.client.post(
        "/v1/responses", json={**body(stream=True, max_output_tokens=1500), "model": "mock-slow"}))
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
    await gw.post("/v1/responses", json=body(max_output_tokens=3))
    await gw.post("/v1/responses", json=body(max_output_tokens=3, stream=True))
    await gw.post("/v1/responses", json=body(tools=[{"type": "web_search"}]))
    ok = [e for e in recorded if e.status == 200]
    assert [(e.route, e.stream, e.completion_tokens) for e in ok] == [
        ("/v1/responses", False, 3), ("/v1/responses", True, 3)]
    assert all(e.prompt_tokens > 0 and e.model == "mock-fast" for e in ok)
    [rejected] = [e for e in recorded if e.status != 200]
    assert (rejected.route, rejected.status, rejected.error_code) == (
        "/v1/responses", 400, "INVALID_REQUEST")


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("payload", "param", "words"),
    [
        ({"model": "mock-fast"}, "input", "Field required"),
        ({"input": "hi"}, "model", "Field required"),
        (body(input=""), "input", "input is empty"),
        (body(input=[]), "input", "empty list"),
        (body(input=[{"role": "user", "content": [{"type": "input_image"}]}]),
         "input", "needs 'image_url'"),
        (body(input=[{"type": "reasoning", "summary": []}]), "input", "'reasoning'"),
        (body(input=[{"role": "tool", "content": "x"}]), "input", "input item 0.role"),
        (body(input=[{"role": "user"}]), "input", "input item 0.content: Field required"),
        (body(input=42), "input", "string or a list of message items"),
        (body(max_output_tokens=0), "max_output_tokens", "greater than or equal to 1"),
        (body(temperature=3), "temperature", "less than or equal to 2"),
        (body(tools=[{"type": "web_search"}]), "tools.0.type", "'function'"),
        (body(previous_response_id="resp_1"), "previous_response_id", "not stored"),
        (body(background=True), "background", "background"),
        (body(text={"format": {"type": "yaml"}}), "text.format.type", "json_schema"),
    ],
)
async def test_bad_input_is_a_400_naming_the_field(
    gw: GatewayUnderTest, payload: dict[str, Any], param: str, words: str
) -> None:
    r = await gw.post("/v1/responses", json=payload)
    err = assert_openai_error(r, 400, "invalid_request")
    assert err["type"] == "invalid_request_error"
    assert err["param"] == param
    assert words in err["message"] and "Example" in err["message"]


async def test_unknown_model_is_a_404_in_the_openai_envelope(gw: GatewayUnderTest) -> None:
    r = await gw.post("/v1/responses", json=body(model="gpt-nope"))
    err = assert_openai_error(r, 404, "model_not_found")
    assert err["type"] == "not_found_error" and "mock-fast" in err["message"]


async def test_body_that_is_not_json_is_a_400(gw: GatewayUnderTest) -> None:
    r = await gw.post("/v1/responses", content=b"{nope", headers={"content-type": "application/json"})
    assert_openai_error(r, 400, "invalid_request")

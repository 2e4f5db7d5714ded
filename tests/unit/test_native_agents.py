"""Native REST for agents (issue 15): tools, JSON, logprobs and images in the native
envelope, the raw flag, GET /models in its own envelope, embeddings token-id checks."""

from __future__ import annotations

import json

import orjson
import pytest

from tests.unit.agent_fakes import PNG, WEATHER, agw  # noqa: F401
from tests.unit.gateway_fakes import assert_native_error, sse_events
from tests.unit.modality_fakes import mgw  # noqa: F401

ASK = [{"role": "user", "content": "What is the weather?"}]


async def test_native_tool_call_unary_and_streamed(agw) -> None:
    body = {"model": "mock-fast", "messages": ASK, "tools": [WEATHER], "tool_choice": "required"}
    unary = (await agw.post("/inference", json=body)).json()
    assert unary["finish_reason"] == "tool_calls"
    (call,) = unary["tool_calls"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"])["days"] == 1
    streamed = await agw.post("/inference/stream", json=body)
    events = [orjson.loads(e["data"]) for e in sse_events(streamed)]
    fragments = [e["tool_call"] for e in events if "tool_call" in e]
    assert fragments[0]["name"] == "get_weather" and "id" in fragments[0]
    assert "".join(f["arguments"] for f in fragments) == call["arguments"]
    assert events[-1]["done"] and events[-1]["finish_reason"] == "tool_calls"


async def test_native_json_format_and_logprobs(agw) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    out = (await agw.post("/inference", json={
        "model": "mock-fast", "prompt": "count", "response_format": {
            "type": "json_schema", "json_schema": {"name": "c", "schema": schema}}})).json()
    assert json.loads(out["text"]) == {"n": 0}
    lp = (await agw.post("/inference", json={"model": "mock-fast", "prompt": "x", "max_tokens": 3,
                                             "logprobs": True, "top_logprobs": 1})).json()
    assert len(lp["logprobs"]) == 3 and len(lp["logprobs"][0]["top"]) == 1
    stream = await agw.post("/inference/stream", json={
        "model": "mock-fast", "prompt": "x", "max_tokens": 3, "logprobs": True})
    tokens = [orjson.loads(e["data"]) for e in sse_events(stream)]
    assert [t["token"] for e in tokens if "logprobs" in e for t in e["logprobs"]] == [
        t["token"] for t in lp["logprobs"]]


async def test_native_images_need_a_vision_model(agw) -> None:
    msg = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}]
    ok = await agw.post("/inference", json={"model": "mock-vision", "messages": msg})
    assert ok.status_code == 200
    refused = await agw.post("/inference", json={"model": "mock-fast", "messages": msg})
    assert "mock-vision" in assert_native_error(refused, 400, "INVALID_REQUEST")["error"]["message"]


async def test_raw_is_a_boolean_flag(agw) -> None:
    ok = await agw.post("/inference", json={"model": "mock-fast", "prompt": "x", "raw": True})
    assert ok.status_code == 200
    bad = await agw.post("/inference", json={"model": "mock-fast", "prompt": "x", "raw": "maybe"})
    assert assert_native_error(bad, 400, "INVALID_REQUEST")["error"]["details"]["param"] == "raw"


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "bad name"}}]),
    ("tool_choice", "required"),
    ("response_format", {"type": "json_schema"}),
    ("top_logprobs", 30),
    ("logit_bias", {"x": 1}),
    ("presence_penalty", 9),
])
async def test_native_bad_agent_fields_are_400_naming_them(agw, field, value) -> None:
    r = await agw.post("/inference", json={"model": "mock-fast", "prompt": "x", field: value})
    assert assert_native_error(r, 400, "INVALID_REQUEST")["error"]["details"]["param"].startswith(field)


async def test_native_models_use_the_native_envelope(agw) -> None:
    body = (await agw.get("/models")).json()
    assert set(body) == {"models"}
    card = {m["id"]: m for m in body["models"]}["mock-fast"]
    assert {"id", "name", "type", "size_bytes", "loaded", "context_size",
            "capabilities"} <= set(card)
    assert card["type"] == "text" and card["context_size"] == 4096 and card["loaded"]
    assert (await agw.get("/v1/models")).json()["object"] == "list"


@pytest.mark.parametrize("tokens", [[-1, 5], [10**20], [[3], [2**40]]])
async def test_embedding_token_ids_outside_the_vocabulary_are_400(mgw, tokens) -> None:
    r = await mgw.post("/v1/embeddings", json={"model": "emb", "input": tokens})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "input"

"""/v1/messages for agents, through the official anthropic client against the mock: tool
use round trip, streamed input_json_delta, image blocks, JSON-only mode, bad input."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import jsonschema
import pytest

from tests.unit.agent_fakes import PNG, WEATHER, agw, claude  # noqa: F401

MODEL = "mock-fast"
TOOL = {"name": "get_weather", "description": "Weather by city",
        "input_schema": WEATHER["function"]["parameters"]}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


async def test_tool_use_round_trip(claude) -> None:
    first = await claude.messages.create(model=MODEL, max_tokens=64, messages=ASK, tools=[TOOL],
                                         tool_choice={"type": "any"})
    assert first.stop_reason == "tool_use"
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather"
    jsonschema.validate(use.input, TOOL["input_schema"])
    history = [*ASK, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
               {"role": "user", "content": [
                   {"type": "tool_result", "tool_use_id": use.id, "content": "3 C and windy"}]}]
    second = await claude.messages.create(model=MODEL, max_tokens=64, messages=history,
                                          tools=[TOOL])
    assert second.stop_reason == "end_turn" and second.content[0].type == "text"


async def test_streamed_tool_input_reassembles_to_the_unary_call(claude) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, max_tokens=64, messages=ASK, tools=[TOOL],
                                  tool_choice={"type": "tool", "name": "get_weather"})
    unary = await claude.messages.create(**kwargs)
    partials = []
    async with claude.messages.stream(**kwargs) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                partials.append(event.delta.partial_json)
        final = await stream.get_final_message()
    assert len(partials) > 1 and final.stop_reason == "tool_use"
    (use,) = [b for b in final.content if b.type == "tool_use"]
    (unary_use,) = [b for b in unary.content if b.type == "tool_use"]
    assert use.input == unary_use.input == json.loads("".join(partials))


async def test_image_blocks_reach_a_vision_model(claude) -> None:
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG.split(",", 1)[1]}}
    msg = [{"role": "user", "content": [image, {"type": "text", "text": "What is it?"}]}]
    out = await claude.messages.create(model="mock-vision", max_tokens=16, messages=msg)
    assert out.content[0].text
    with pytest.raises(anthropic.BadRequestError, match="mock-vision"):
        await claude.messages.create(model=MODEL, max_tokens=16, messages=msg)


async def test_json_only_mode_returns_an_instance_of_the_schema(agw) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    r = await agw.post("/v1/messages", json={
        "model": MODEL, "max_tokens": 64, "messages": ASK,
        "output_config": {"format": {"type": "json_schema", "schema": schema}}})
    assert r.status_code == 200, r.text
    assert json.loads(r.json()["content"][0]["text"]) == {"ok": False}


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "max_tokens": 16, "messages": ASK, **extra}


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("server tool", _body(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
     "tools.0"),
    ("tool without input_schema", _body(tools=[{"name": "f"}]), "tools.0.input_schema"),
    ("tool name with spaces", _body(tools=[{**TOOL, "name": "get weather"}]), "tools.0.name"),
    ("input_schema invalid", _body(tools=[{**TOOL, "input_schema": {"type": "object",
     "required": "city"}}]), "tools.0.input_schema"),
    ("tool_choice of unknown type", _body(tools=[TOOL], tool_choice={"type": "all"}),
     "tool_choice.type"),
    ("tool_choice tool without name", _body(tools=[TOOL], tool_choice={"type": "tool"}),
     "tool_choice"),
    ("tool_choice names a missing tool", _body(tools=[TOOL],
     tool_choice={"type": "tool", "name": "nope"}), "tool_choice"),
    ("tool_choice any without tools", _body(tool_choice={"type": "any"}), "tool_choice"),
    ("tool_result without tool_use_id", _body(messages=[{"role": "user", "content": [
        {"type": "tool_result", "content": "x"}]}]), "messages.0.content"),
    ("tool_use without input", _body(messages=[*ASK, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t1", "name": "f"}]}, *ASK]), "messages.1.content"),
    ("image in an assistant turn", _body(messages=[*ASK, {"role": "assistant", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}, *ASK]),
     "messages"),
    ("document block", _body(messages=[{"role": "user", "content": [
        {"type": "document", "source": {}}]}]), "messages.0.content"),
    ("image for a text-only model", _body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]), "messages"),
    ("image url not allowed", {**_body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}]}]),
        "model": "mock-vision"}, "image_url"),
    ("image media type unknown", _body(messages=[{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/tiff",
                                     "data": "AAAA"}}]}]), "messages.0.content"),
    ("output_format not json_schema", _body(extra_body={"output_format": {"type": "yaml"}}),
     "output_format"),
    ("output_config schema invalid", _body(output_config={"format": {
        "type": "json_schema", "schema": {"type": "objekt"}}}), "output_config"),
    ("mcp_servers", _body(extra_body={"mcp_servers": [{"url": "https://x"}]}), "mcp_servers"),
]


@pytest.mark.parametrize("case,body,param", BAD, ids=[c[0] for c in BAD])
async def test_bad_agent_input_is_a_400_naming_the_field(claude, case, body, param) -> None:
    with pytest.raises(anthropic.BadRequestError) as err:
        await claude.messages.create(**body)
    assert err.value.status_code == 400
    assert param in err.value.message, err.value.message

"""/v1/responses for agents through the official openai client against the mock: function
tools, function_call items, the argument stream events, text.format, input_image."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.unit.agent_fakes import PNG, WEATHER, agw, oai  # noqa: F401

MODEL = "mock-fast"
TOOL = {"type": "function", "name": "get_weather", "description": "Weather by city",
        "parameters": WEATHER["function"]["parameters"]}
ASK = "What is the weather in Oslo?"


async def test_function_call_round_trip(oai) -> None:
    first = await oai.responses.create(model=MODEL, input=ASK, tools=[TOOL],
                                       tool_choice="required")
    (call,) = [o for o in first.output if o.type == "function_call"]
    assert call.name == "get_weather" and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), TOOL["parameters"])
    history: list[Any] = [{"role": "user", "content": ASK}, call.model_dump(exclude_none=True),
                          {"type": "function_call_output", "call_id": call.call_id,
                           "output": '{"temp_c": 3}'}]
    second = await oai.responses.create(model=MODEL, input=history, tools=[TOOL])
    assert second.output_text and not [o for o in second.output if o.type == "function_call"]


async def test_streamed_arguments_reassemble_to_the_unary_call(oai) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, input=ASK, tools=[TOOL],
                                  tool_choice={"type": "function", "name": "get_weather"})
    unary = [o for o in (await oai.responses.create(**kwargs)).output
             if o.type == "function_call"][0]
    deltas, done, added = [], None, None
    stream = await oai.responses.create(stream=True, **kwargs)
    final = None
    async for event in stream:
        if event.type == "response.output_item.added" and event.item.type == "function_call":
            added = event.item
        elif event.type == "response.function_call_arguments.delta":
            deltas.append(event.delta)
        elif event.type == "response.function_call_arguments.done":
            done = event.arguments
        elif event.type == "response.completed":
            final = event.response
    assert added.name == "get_weather" and len(deltas) > 1
    assert "".join(deltas) == done == unary.arguments
    assert [o.arguments for o in final.output if o.type == "function_call"] == [done]


class Verdict(BaseModel):
    label: str
    score: int


async def test_parse_with_text_format_returns_a_parsed_object(oai) -> None:
    out = await oai.responses.parse(model=MODEL, input=ASK, text_format=Verdict)
    assert isinstance(out.output_parsed, Verdict)


async def test_logprobs_on_output_text_unary_and_streamed(oai) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, input="Say something.", max_output_tokens=6,
                                  include=["message.output_text.logprobs"], top_logprobs=2)
    out = await oai.responses.create(**kwargs)
    [part] = out.output[0].content
    tokens = part.logprobs
    assert len(tokens) == 6 and "".join(t.token for t in tokens) == part.text == out.output_text
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token and t.logprob <= 0
               for t in tokens)
    streamed, done, final = [], None, None
    async for event in await oai.responses.create(stream=True, **kwargs):
        if event.type == "response.output_text.delta":
            assert event.logprobs and "".join(t.token for t in event.logprobs) == event.delta
            streamed.extend(event.logprobs)
        elif event.type == "response.output_text.done":
            done = event.logprobs
        elif event.type in ("response.completed", "response.incomplete"):
            final = event.response
    pairs = [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in tokens]
    assert [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in streamed] == pairs
    assert [(t.token, t.logprob) for t in done] == [(t.token, t.logprob) for t in tokens]
    assert final.output[0].content[0].logprobs == part.logprobs
    # Without include or top_logprobs, none; include alone gives the sampled token's only.
    plain = await oai.responses.create(model=MODEL, input="Say something.", max_output_tokens=3)
    assert plain.output[0].content[0].logprobs == []
    bare = await oai.responses.create(model=MODEL, input="Say something.", max_output_tokens=3,
                                      include=["message.output_text.logprobs"])
    assert [t.top_logprobs for t in bare.output[0].content[0].logprobs] == [[], [], []]


async def test_input_image_reaches_a_vision_model(oai) -> None:
    item = {"role": "user", "content": [{"type": "input_text", "text": "What is it?"},
                                        {"type": "input_image", "image_url": PNG}]}
    out = await oai.responses.create(model="mock-vision", input=[item])
    assert out.output_text
    with pytest.raises(openai.BadRequestError) as err:
        await oai.responses.create(model=MODEL, input=[item])
    assert err.value.param == "input" and "mock-vision" in err.value.message


def _body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "input": ASK, **extra}


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("hosted tool", _body(tools=[{"type": "file_search"}]), "tools.0.type"),
    ("function without name", _body(tools=[{"type": "function"}]), "tools.0.name"),
    ("parameters not a schema", _body(tools=[{**TOOL, "parameters": {"type": 1}}]),
     "tools.0.parameters"),
    ("duplicate names", _body(tools=[TOOL, TOOL]), "tools"),
    ("tool_choice names a missing tool", _body(tools=[TOOL], tool_choice={
        "type": "function", "name": "nope"}), "tool_choice"),
    ("tool_choice required without tools", _body(tool_choice="required"), "tool_choice"),
    ("parallel_tool_calls a string", _body(parallel_tool_calls="maybe"), "parallel_tool_calls"),
    ("function_call without call_id", _body(input=[{"type": "function_call", "name": "f",
                                                    "arguments": "{}"}]), "input"),
    ("function_call_output without output", _body(input=[{"type": "function_call_output",
                                                           "call_id": "c"}]), "input"),
    ("json_schema without schema", _body(text={"format": {"type": "json_schema", "name": "x"}}),
     "text.format"),
    ("json_schema invalid schema", _body(text={"format": {"type": "json_schema", "name": "x",
     "schema": {"type": "objekt"}}}), "text.format.schema"),
    ("input_image in a system message", _body(input=[{"role": "system", "content": [
        {"type": "input_image", "image_url": PNG}]}]), "input"),
    ("top_logprobs over 20", _body(top_logprobs=21), "top_logprobs"),
    ("include a value that means nothing here",
     _body(include=["message.output_text.logprobs", "file_search_call.results"]), "include"),
]


@pytest.mark.parametrize("case,body,param", BAD, ids=[c[0] for c in BAD])
async def test_bad_agent_input_is_400_naming_the_field(agw, case, body, param) -> None:
    r = await agw.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text

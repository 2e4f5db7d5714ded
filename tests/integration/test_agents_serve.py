"""Agents through the real Serve app with the mock engines (issue 15), using the official
openai and anthropic clients as users call them: tool round trips on chat, Responses and
Messages, streamed calls reassembling to the unary call, parse() with pydantic models,
n > 1, logprobs, and bad input that is a 400 and never a 5xx."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import jsonschema
import openai
import pytest
from anthropic import Anthropic
from openai import OpenAI
from pydantic import BaseModel

MODEL = "mock-5ms"
PARAMS = {"type": "object", "properties": {"city": {"type": "string"},
                                           "days": {"type": "integer", "minimum": 1}},
          "required": ["city", "days"]}
CHAT_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": PARAMS}}
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def oai(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def claude(base_url: str) -> Anthropic:
    return Anthropic(base_url=base_url, api_key="sk-ant-unused", max_retries=0, timeout=30)


def test_chat_tool_round_trip_and_streamed_call(oai: OpenAI) -> None:
    kwargs: dict[str, Any] = dict(model=MODEL, messages=ASK, tools=[CHAT_TOOL],
                                  tool_choice="required")
    first = oai.chat.completions.create(**kwargs)
    call = first.choices[0].message.tool_calls[0]
    jsonschema.validate(json.loads(call.function.arguments), PARAMS)
    fragments = [tc for chunk in oai.chat.completions.create(stream=True, **kwargs)
                 for c in chunk.choices for tc in c.delta.tool_calls or []]
    assert fragments[0].function.name == "get_weather" and len(fragments) > 2
    assert "".join(f.function.arguments or "" for f in fragments) == call.function.arguments
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "3 C"}]
    final = oai.chat.completions.create(model=MODEL, messages=history, tools=[CHAT_TOOL])
    assert final.choices[0].finish_reason in ("stop", "length")
    assert final.choices[0].message.content and final.choices[0].message.refusal is None


class Forecast(BaseModel):
    city: str
    days: int
    rain: bool


def test_parse_on_chat_and_responses(oai: OpenAI) -> None:
    chat = oai.chat.completions.parse(model=MODEL, messages=ASK, response_format=Forecast)
    assert isinstance(chat.choices[0].message.parsed, Forecast)
    resp = oai.responses.parse(model=MODEL, input="Oslo?", text_format=Forecast)
    assert isinstance(resp.output_parsed, Forecast)


def test_responses_function_call_round_trip(oai: OpenAI) -> None:
    tool = {"type": "function", "name": "get_weather", "parameters": PARAMS}
    first = oai.responses.create(model=MODEL, input="Oslo?", tools=[tool], tool_choice="required")
    (call,) = [o for o in first.output if o.type == "function_call"]
    events = list(oai.responses.create(model=MODEL, input="Oslo?", tools=[tool],
                                       tool_choice="required", stream=True))
    done = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert done == [call.arguments]
    second = oai.responses.create(model=MODEL, tools=[tool], input=[
        {"role": "user", "content": "Oslo?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "3 C"}])
    assert second.output_text


def test_messages_tool_use_round_trip_and_stream(claude: Anthropic) -> None:
    tool = {"name": "get_weather", "input_schema": PARAMS}
    kwargs: dict[str, Any] = dict(model=MODEL, max_tokens=64, messages=ASK, tools=[tool],
                                  tool_choice={"type": "any"})
    first = claude.messages.create(**kwargs)
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert first.stop_reason == "tool_use"
    jsonschema.validate(use.input, PARAMS)
    with claude.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert [b.input for b in streamed.content if b.type == "tool_use"] == [use.input]
    second = claude.messages.create(model=MODEL, max_tokens=32, tools=[tool], messages=[
        *ASK, {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                      "content": "3 C"}]}])
    assert second.stop_reason in ("end_turn", "max_tokens")


def test_n_choices_and_logprobs(oai: OpenAI) -> None:
    out = oai.chat.completions.create(model=MODEL, messages=ASK, n=2, max_tokens=4,
                                      logprobs=True, top_logprobs=3)
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 8
    assert all(len(c.logprobs.content) == 4 for c in out.choices)
    assert all(len(t.top_logprobs) == 3 for c in out.choices for t in c.logprobs.content)
    texts: dict[int, str] = {}
    for chunk in oai.chat.completions.create(model=MODEL, messages=ASK, n=2, max_tokens=4,
                                             stream=True):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert sorted(texts) == [0, 1] and all(texts.values())


@pytest.mark.parametrize("extra,param", [
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21, "stream": True}, "top_logprobs"),
    ({"logit_bias": {"123456789": 5}}, "logit_bias"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                  "schema": {"type": 7}}}},
     "response_format.json_schema.schema"),
])
def test_bad_agent_input_is_a_400_naming_the_field(oai: OpenAI, extra, param) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model=MODEL, messages=ASK, **extra)
    assert err.value.param == param


def test_a_remote_adapter_carries_tools_and_refuses_what_its_provider_cannot_say(
        oai: OpenAI, claude: Anthropic) -> None:
    forced = oai.chat.completions.create(model="remote-gpt", messages=ASK, tools=[CHAT_TOOL],
                                         tool_choice="required")
    call = forced.choices[0].message.tool_calls[0]
    assert forced.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), PARAMS)
    used = claude.messages.create(model="remote-gpt", max_tokens=64, messages=ASK,
                                  tools=[{"name": "get_weather", "input_schema": PARAMS}],
                                  tool_choice={"type": "any"})
    assert used.stop_reason == "tool_use" and used.content[-1].name == "get_weather"
    with pytest.raises(openai.BadRequestError) as err:  # chat upstreams take text turns only
        oai.completions.create(model="remote-gpt", prompt=[1, 2, 3], max_tokens=4)
    assert err.value.param == "prompt" and "openai provider" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:  # no provider returns prompt logprobs
        oai.completions.create(model="remote-gpt", prompt="hi", echo=True, logprobs=1, max_tokens=4)
    assert err.value.param == "echo"

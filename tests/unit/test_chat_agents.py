"""/v1/chat/completions for agents, driven by the official openai client against the mock:
tool calls (unary and streamed), structured outputs, n > 1, logprobs, images."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.unit.agent_fakes import PNG, TIME, WEATHER, agw, claude, oai  # noqa: F401

MODEL = "mock-fast"
ASK = [{"role": "user", "content": "What is the weather in Oslo?"}]


def _valid_args(call: Any, tool: dict) -> dict:
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, tool["function"]["parameters"])
    return args


async def test_required_tool_choice_returns_a_valid_call(oai) -> None:
    out = await oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required")
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.refusal is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert _valid_args(call, WEATHER)["unit"] == "c"


async def test_named_tool_choice_calls_that_tool(oai) -> None:
    out = await oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_time"}})
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_time" and _valid_args(call, TIME) == {"tz": ""}


async def test_auto_calls_the_tools_the_user_names_in_parallel(oai) -> None:
    ask = [{"role": "user", "content": "use get_weather and get_time"}]
    out = await oai.chat.completions.create(model=MODEL, messages=ask, tools=[WEATHER, TIME])
    assert [c.function.name for c in out.choices[0].message.tool_calls] == [
        "get_weather", "get_time"]
    single = await oai.chat.completions.create(
        model=MODEL, messages=ask, tools=[WEATHER, TIME], parallel_tool_calls=False)
    assert len(single.choices[0].message.tool_calls) == 1


async def test_tool_choice_none_answers_in_text(oai) -> None:
    out = await oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "get_weather please"}],
        tools=[WEATHER], tool_choice="none")
    assert out.choices[0].message.tool_calls is None and out.choices[0].message.content


async def test_tool_round_trip_ends_in_a_text_answer(oai) -> None:
    first = await oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    history = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 3}'}]
    second = await oai.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER])
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content and not second.choices[0].message.tool_calls


async def test_streamed_tool_call_deltas_reassemble_to_the_unary_call(oai) -> None:
    kwargs = dict(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required")
    unary = (await oai.chat.completions.create(**kwargs)).choices[0].message.tool_calls[0]
    stream = await oai.chat.completions.create(stream=True, **kwargs)
    deltas, finish = [], None
    async for chunk in stream:
        for choice in chunk.choices:
            deltas.extend(choice.delta.tool_calls or [])
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    first, rest = deltas[0], deltas[1:]
    assert first.id and first.type == "function" and first.function.name == "get_weather"
    assert len(rest) > 1, "arguments arrive in several fragments"
    assert all(d.id is None and d.function.name is None and d.index == 0 for d in rest)
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert arguments == unary.function.arguments


class Forecast(BaseModel):
    city: str
    high_c: float
    rain: bool
    tags: list[str]


async def test_parse_with_a_pydantic_model_returns_a_parsed_object(oai) -> None:
    out = await oai.chat.completions.parse(
        model=MODEL, messages=ASK, response_format=Forecast)
    parsed = out.choices[0].message.parsed
    assert isinstance(parsed, Forecast) and parsed.tags == []


async def test_json_object_mode_returns_json(oai) -> None:
    out = await oai.chat.completions.create(
        model=MODEL, messages=ASK, response_format={"type": "json_object"})
    assert json.loads(out.choices[0].message.content) == {}


async def test_n_choices_unary_and_streamed(oai) -> None:
    out = await oai.chat.completions.create(model=MODEL, messages=ASK, n=3, seed=7, max_tokens=4)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert out.usage.completion_tokens == 12, "each choice is metered"
    assert len({c.message.content for c in out.choices}) > 1, "seed + i makes choices differ"
    stream = await oai.chat.completions.create(
        model=MODEL, messages=ASK, n=3, seed=7, max_tokens=4, stream=True,
        stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    usage = None
    async for chunk in stream:
        usage = chunk.usage or usage
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
    assert [texts[i] for i in range(3)] == [c.message.content for c in out.choices]
    assert usage.completion_tokens == out.usage.completion_tokens
    assert usage.prompt_tokens == out.usage.prompt_tokens


async def test_logprobs_with_top_alternatives(oai) -> None:
    out = await oai.chat.completions.create(
        model=MODEL, messages=ASK, logprobs=True, top_logprobs=2, max_tokens=5)
    content = out.choices[0].logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == out.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].token == t.token for t in content)
    assert all(t.logprob <= 0 for t in content)
    stream = await oai.chat.completions.create(
        model=MODEL, messages=ASK, logprobs=True, top_logprobs=2, max_tokens=5, stream=True)
    streamed = [t async for chunk in stream for c in chunk.choices
                for t in (c.logprobs.content if c.logprobs else [])]
    assert [(t.token, t.logprob) for t in streamed] == [(t.token, t.logprob) for t in content]


async def test_penalties_and_logit_bias_are_accepted(oai) -> None:
    out = await oai.chat.completions.create(
        model=MODEL, messages=ASK, presence_penalty=1.5, frequency_penalty=-1,
        logit_bias={"42": -100, "7": 5})
    assert out.choices[0].message.content


async def test_images_go_to_a_vision_model(oai) -> None:
    msg = [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}]}]
    out = await oai.chat.completions.create(model="mock-vision", messages=msg)
    assert out.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        await oai.chat.completions.create(model=MODEL, messages=msg)
    assert "mock-vision" in err.value.message and err.value.param == "messages"


async def test_models_list_the_vision_capability(oai) -> None:
    cards = {m.id: m for m in (await oai.models.list()).data}
    assert "vision" in cards["mock-vision"].capabilities
    assert "vision" not in cards[MODEL].capabilities


# ------------------------------------------------------------------ completions


async def test_completion_prompts_of_every_shape(oai) -> None:
    ids = await oai.completions.create(model=MODEL, prompt=[3, 4, 5], max_tokens=3)
    assert ids.choices[0].text and ids.usage.prompt_tokens == 3
    lists = await oai.completions.create(model=MODEL, prompt=[[3], [4, 5]], n=2, max_tokens=3)
    assert [c.index for c in lists.choices] == [0, 1, 2, 3]
    strings = await oai.completions.create(model=MODEL, prompt=["a b", "c"], max_tokens=3)
    assert strings.usage.prompt_tokens == 3 and len(strings.choices) == 2


async def test_completion_echo_and_integer_logprobs(oai) -> None:
    out = await oai.completions.create(model=MODEL, prompt="Once upon", echo=True, logprobs=2,
                                       max_tokens=4)
    choice = out.choices[0]
    assert choice.text.startswith("Once upon")
    lp = choice.logprobs
    # As OpenAI answers: the prompt's tokens first (the very first without a logprob).
    assert lp.tokens[:2] == ["Once", " upon"] and len(lp.tokens) == 2 + 4
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v < 0 for v in lp.token_logprobs[1:])
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == choice.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    streamed: list = []
    text = ""
    async for chunk in await oai.completions.create(model=MODEL, prompt="Once upon", echo=True,
                                                    logprobs=2, max_tokens=4, stream=True):
        for c in chunk.choices:
            text += c.text
            if c.logprobs:
                streamed.extend(zip(c.logprobs.tokens, c.logprobs.token_logprobs,
                                    c.logprobs.text_offset))
    assert text == choice.text
    assert streamed == list(zip(lp.tokens, lp.token_logprobs, lp.text_offset))
    echoed = await oai.completions.create(model=MODEL, prompt=[0, 1], echo=True, max_tokens=2)
    assert echoed.choices[0].text.startswith("the a")
    with_ids = await oai.completions.create(model=MODEL, prompt=[0, 1], echo=True, max_tokens=2,
                                            logprobs=0)
    ids_lp = with_ids.choices[0].logprobs
    assert ids_lp.tokens[:2] == ["the", " a"] and ids_lp.token_logprobs[0] is None
    assert "".join(ids_lp.tokens) == with_ids.choices[0].text


async def test_streamed_completions_for_several_prompts(oai) -> None:
    stream = await oai.completions.create(model=MODEL, prompt=["a", "b"], n=2, max_tokens=3,
                                          stream=True, logprobs=1)
    texts: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    async for chunk in stream:
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            tokens.setdefault(c.index, []).extend(c.logprobs.tokens if c.logprobs else [])
    assert sorted(texts) == [0, 1, 2, 3]
    assert all("".join(tokens[i]) == texts[i] for i in texts)

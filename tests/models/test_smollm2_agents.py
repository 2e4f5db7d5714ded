"""Structured outputs, forced tool calls, auto tool calls, logprobs and penalties on the
real bundled SmolLM2-135M-Instruct in process (no Ray).

The 20-of-20 runs are the issue's bar: a constrained output must parse and validate
every time, even from a 135M model. Outputs are short so the module stays around a
minute on a busy 2-core machine.
"""

from __future__ import annotations

import json

import jsonschema
import pytest
import pytest_asyncio
import torch

from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import (
    ChatMessage,
    GenerationRequest,
    NamedTool,
    ResponseFormat,
    SamplingParams,
    ToolCall,
    ToolSpec,
    merge_tool_call_deltas,
)
from serve_app.settings import TransformersEngineConfig

pytestmark = [pytest.mark.models, pytest.mark.asyncio(loop_scope="module")]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "city": {"type": "string", "maxLength": 24},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
REVIEW = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "integer", "minimum": 0, "maximum": 10},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 16}, "maxItems": 3},
    },
    "required": ["sentiment", "score", "tags"],
    "additionalProperties": False,
}
RECIPE = {
    "$defs": {"step": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
              "text": {"type": "string", "maxLength": 30}}, "required": ["n", "text"],
              "additionalProperties": False}},
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 24},
                   "steps": {"type": "array", "items": {"$ref": "#/$defs/step"}, "minItems": 1, "maxItems": 1},
                   "vegan": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}},
    "required": ["title", "steps", "vegan"],
    "additionalProperties": False,
}
PROMPTS = [
    ("Describe Marie Curie as a person record.", PERSON),
    ("Make up a person who lives in Tokyo.", PERSON),
    ("Give me the details of a fictional 30 year old baker.", PERSON),
    ("Who is Sherlock Holmes? Answer as data.", PERSON),
    ("Invent a retired teacher from Lisbon.", PERSON),
    ("Create a character for a fantasy novel.", PERSON),
    ("Review: the food was cold and the waiter rude.", REVIEW),
    ("Review: best concert of my life!", REVIEW),
    ("Review: it was fine, nothing special.", REVIEW),
    ("Classify this review: the phone battery dies in an hour.", REVIEW),
    ("Review of a movie you liked.", REVIEW),
    ("Review: the hotel room was clean and quiet.", REVIEW),
    ("Review: too expensive for what it is.", REVIEW),
    ("A recipe for pancakes.", RECIPE),
    ("How do I make tea?", RECIPE),
    ("Give me a salad recipe.", RECIPE),
    ("Recipe: scrambled eggs.", RECIPE),
    ("Write a recipe for lemonade.", RECIPE),
    ("A quick pasta recipe, please.", RECIPE),
    ("Toast with jam: the recipe.", RECIPE),
]
WEATHER = ToolSpec("get_weather", "Current weather for a city", {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 24},
                   "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False})
ADD = ToolSpec("add", "Add two integers", {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": -9999, "maximum": 9999},
                                   "b": {"type": "integer", "minimum": -9999, "maximum": 9999}},
    "required": ["a", "b"], "additionalProperties": False})
TOOL_PROMPTS = [
    "What's the weather in Paris?", "Is it raining in London?", "Add 2 and 3.", "What is 40 plus 2?",
    "Weather in Tokyo in fahrenheit, please.", "How cold is it in Oslo?", "Sum 7 and 8.",
    "Tell me the temperature in Cairo.", "What is 100 + 23?", "Is it sunny in Rome?",
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    torch.set_num_threads(1)
    from deployments.engines.transformers_cpu import TransformersTextEngine

    eng = TransformersTextEngine("smollm2", TransformersEngineConfig(num_threads=1))
    await eng.start()
    yield eng
    await eng.shutdown()


def chat(rid: str, text: str, **kw) -> GenerationRequest:
    # Room for the longest instance the schemas allow, even spelt one character per token.
    sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": 200, **kw.pop("sampling", {})})
    return GenerationRequest(rid, sampling, messages=[ChatMessage("user", text)], **kw)


async def run(engine, request):
    outs = [o async for o in engine.generate(request)]
    return "".join(o.text for o in outs), outs


async def test_json_schema_outputs_parse_and_validate_20_of_20(engine):
    for i, (prompt, schema) in enumerate(PROMPTS):
        fmt = ResponseFormat("json_schema", schema, "answer", True)
        # Half greedy, half sampled: the guarantee must not depend on the sampler.
        sampling = {"temperature": 0.8, "seed": i} if i % 2 else {}
        text, outs = await run(engine, chat(f"js{i}", prompt, response_format=fmt, sampling=sampling))
        jsonschema.validate(json.loads(text), schema)
        assert outs[-1].finish_reason == "stop", (prompt, text)


async def test_json_object_and_a_cached_grammar(engine):
    from deployments.engines.constraints import grammar_cache_for

    text, outs = await run(engine, chat("jo", "List three colors.", response_format=ResponseFormat("json_object")))
    assert isinstance(json.loads(text), dict) and outs[-1].finish_reason == "stop"
    before = grammar_cache_for(engine._tokenizer).hits
    await run(engine, chat("jo2", "One color.", response_format=ResponseFormat("json_object"), sampling={"max_tokens": 40}))
    assert grammar_cache_for(engine._tokenizer).hits == before + 1


async def test_unsupported_schema_is_a_400_before_generation(engine):
    fmt = ResponseFormat("json_schema", {"type": "array", "uniqueItems": True}, "x")
    with pytest.raises(InvalidRequest, match="uniqueItems"):
        await run(engine, chat("bad", "hi", response_format=fmt))
    assert engine.active_requests() == 0


async def test_required_and_named_tool_calls_are_valid_20_of_20(engine):
    tools = (WEATHER, ADD)
    for i in range(20):
        prompt = TOOL_PROMPTS[i % len(TOOL_PROMPTS)]
        choice = "required" if i < 10 else NamedTool("add" if "dd" in prompt or "+" in prompt or "um" in prompt else "get_weather")
        sampling = {"temperature": 0.7, "seed": i} if i % 2 else {}
        text, outs = await run(engine, chat(f"tc{i}", prompt, tools=tools, tool_choice=choice, sampling=sampling))
        assert text == "" and outs[-1].finish_reason == "tool_calls", text
        [call] = merge_tool_call_deltas([d for o in outs for d in o.tool_calls or ()])
        assert call.id.startswith("call_")
        spec = next(t for t in tools if t.name == call.name)
        if isinstance(choice, NamedTool):
            assert call.name == choice.name
        jsonschema.validate(json.loads(call.arguments), spec.parameters)


async def test_auto_tool_call_round_trip(engine):
    """The model may or may not call in auto mode; whatever comes out is well formed."""
    request = chat("auto", "What's the weather in Paris? Use the tool.", tools=(WEATHER,))
    text, outs = await run(engine, request)
    calls = merge_tool_call_deltas([d for o in outs for d in o.tool_calls or ()])
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), WEATHER.parameters)
    assert outs[-1].finish_reason == ("tool_calls" if calls else "stop") or outs[-1].finish_reason == "length"
    # The result fed back: the history renders and the model answers in text.
    history = [ChatMessage("user", "What's the weather in Paris?"),
               ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}'),)),
               ChatMessage("tool", "18 degrees and sunny", tool_call_id="call_1")]
    final = GenerationRequest("auto2", SamplingParams(temperature=0.0, max_tokens=30), messages=history,
                              tools=(WEATHER,), tool_choice="none")
    text, outs = await run(engine, final)
    assert text.strip() and not any(o.tool_calls for o in outs)


async def test_logprobs_penalties_and_logit_bias(engine):
    question = "What is the capital of France?"
    text, outs = await run(engine, chat("lp", question, sampling={"max_tokens": 8, "logprobs": 3}))
    entries = [e for o in outs for e in o.logprobs or ()]
    tokens = sum(o.num_tokens for o in outs)
    assert tokens - 1 <= len(entries) <= tokens  # an EOS counts as a token but has no entry
    assert "".join(e.token for e in entries) == text
    assert all(len(e.top) == 3 and e.top[0][2] >= e.logprob - 1e-4 for e in entries)  # greedy: top is the pick
    # A long answer repeats tokens (" a", ","), which the penalties must then steer away from
    # (a short one may repeat none and so be left as it is; 20 tokens with only the frequency
    # penalty kept their greedy choice here).
    story = "Write a long story about a lighthouse keeper."
    plain, _ = await run(engine, chat("np", story, sampling={"max_tokens": 40}))
    penalised, _ = await run(engine, chat("fp", story, sampling={
        "max_tokens": 40, "frequency_penalty": 2.0, "presence_penalty": 2.0}))
    assert penalised != plain
    first = entries[0].token_id
    _, banned = await run(engine, chat("lb", question, sampling={"max_tokens": 2, "logprobs": 0, "logit_bias": {first: -100}}))
    assert banned[0].logprobs[0].token_id != first
    forced = engine._tokenizer.encode("Hello", add_special_tokens=False)[0]
    _, pushed = await run(engine, chat("lb+", question, sampling={"max_tokens": 2, "logprobs": 0, "logit_bias": {forced: 100}}))
    assert pushed[0].logprobs[0].token_id == forced
    with pytest.raises(InvalidRequest, match="99999999"):
        await run(engine, chat("lb2", "hi", sampling={"logit_bias": {99999999: 1}}))


async def test_token_id_prompt_is_checked_and_echoed(engine):
    ids = tuple(engine._tokenizer.encode("The capital of France is", add_special_tokens=False))
    request = GenerationRequest("ids", SamplingParams(max_tokens=4, temperature=0.0, echo=True), prompt_token_ids=ids)
    text, outs = await run(engine, request)
    assert outs[0].text == "The capital of France is" and outs[0].num_tokens == 0
    assert outs[-1].prompt_tokens == len(ids)
    with pytest.raises(InvalidRequest, match="49152"):
        await run(engine, GenerationRequest("bad", SamplingParams(max_tokens=4), prompt_token_ids=(1, 49152)))


async def test_echo_prompt_logprobs_match_a_hand_computation(engine):
    """``echo`` + ``logprobs`` on completions: each prompt token's logprob given the tokens
    before it, checked against the model run by hand on every prefix."""
    prompt = "The capital of France is"
    request = GenerationRequest("echo-lp", SamplingParams(max_tokens=3, temperature=0.0, logprobs=2,
                                                          prompt_logprobs=2), prompt=prompt, raw=True)
    text, outs = await run(engine, request)
    entries = outs[0].prompt_logprobs
    assert all(o.prompt_logprobs is None for o in outs[1:])
    ids = engine._tokenizer.encode(prompt, add_special_tokens=False)
    assert [e.token_id for e in entries] == ids and "".join(e.token for e in entries) == prompt
    from deployments.engines.weights import prompt_rows

    model = engine._model
    with torch.inference_mode():
        for i in range(1, len(ids)):
            logp = torch.log_softmax(model(torch.tensor([ids[:i]])).logits[0, -1].float(), dim=-1)
            assert entries[i].logprob == pytest.approx(float(logp[ids[i]]), abs=1e-3)
            best = torch.topk(logp, 2)
            assert [t[1] for t in entries[i].top] == best.indices.tolist()
        # The first generated token continues the same distribution, as the engine
        # computes a prompt: its rows through the int8 layers' bf16 copy (weights.py).
        # (Through the int8 kernel instead, the logprob moved by 0.04 on an AMX CPU.)
        with prompt_rows(torch.ones(len(ids), dtype=torch.bool)):
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)
    first = next(e for o in outs for e in o.logprobs or ())
    assert first.logprob == pytest.approx(float(logp[first.token_id]), abs=1e-2)
    assert text  # the completion itself still comes

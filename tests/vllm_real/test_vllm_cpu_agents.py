"""The vLLM adapter's agent paths on the real vLLM CPU build (``make test-vllm``): json_schema
structured outputs, required / named / auto tool calls, logprobs with top_logprobs, n > 1
and stop strings, on the bundled SmolLM2-135M-Instruct.

The prompts and schemas are the CPU engine's (tests/models/test_smollm2_agents.py), so both
engines are held to the same bar: a constrained output parses and validates every time.
vLLM enforces the constraint itself (``StructuredOutputsParams``); Troupe only compiles the
schema first so an unsupported keyword is a 400 naming it.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import pytest

from serve_app.errors import InvalidRequest
from serve_app.gateway.fanout import fan_out
from serve_app.protocol.internal import (
    ChatMessage,
    GenerationRequest,
    NamedTool,
    ResponseFormat,
    SamplingParams,
    ToolCall,
    merge_tool_call_deltas,
)
from tests.models.test_smollm2_agents import ADD, PROMPTS, TOOL_PROMPTS, WEATHER
from tests.vllm_real.conftest import skip_reason

_SKIP = skip_reason()
pytestmark = [
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.asyncio(loop_scope="session"),
]


def chat(rid: str, text: str, **kw) -> GenerationRequest:
    sampling = SamplingParams(**{"temperature": 0.0, "max_tokens": 200, **kw.pop("sampling", {})})
    return GenerationRequest(rid, sampling, messages=[ChatMessage("user", text)], **kw)


async def run(engine, request):
    outs = [o async for o in engine.generate(request)]
    return "".join(o.text for o in outs), outs


async def test_json_schema_outputs_parse_and_validate_20_of_20(engine):
    for i, (prompt, schema) in enumerate(PROMPTS):
        fmt = ResponseFormat("json_schema", schema, "answer", True)
        sampling = {"temperature": 0.8, "seed": i} if i % 2 else {}
        text, outs = await run(engine, chat(f"js{i}", prompt, response_format=fmt, sampling=sampling))
        jsonschema.validate(json.loads(text), schema)
        assert outs[-1].finish_reason == "stop", (prompt, text)


async def test_json_object_is_an_object(engine):
    text, outs = await run(engine, chat("jo", "List three colors.", response_format=ResponseFormat("json_object")))
    assert isinstance(json.loads(text), dict) and outs[-1].finish_reason == "stop"


async def test_unsupported_schema_is_a_400_before_vllm_sees_it(engine):
    fmt = ResponseFormat("json_schema", {"type": "array", "uniqueItems": True}, "x")
    with pytest.raises(InvalidRequest, match="uniqueItems"):
        await run(engine, chat("bad", "hi", response_format=fmt))
    assert engine.active_requests() == 0


async def test_required_and_named_tool_calls_are_valid_20_of_20(engine):
    tools = (WEATHER, ADD)
    for i in range(20):
        prompt = TOOL_PROMPTS[i % len(TOOL_PROMPTS)]
        arith = any(w in prompt for w in ("dd", "+", "um", "plus"))
        choice = "required" if i < 10 else NamedTool("add" if arith else "get_weather")
        sampling = {"temperature": 0.7, "seed": i} if i % 2 else {}
        text, outs = await run(engine, chat(f"tc{i}", prompt, tools=tools, tool_choice=choice, sampling=sampling))
        assert text == "" and outs[-1].finish_reason == "tool_calls", text
        [call] = merge_tool_call_deltas([d for o in outs for d in o.tool_calls or ()])
        assert call.id.startswith("call_")
        spec = next(t for t in tools if t.name == call.name)
        if isinstance(choice, NamedTool):
            assert call.name == choice.name
        jsonschema.validate(json.loads(call.arguments), spec.parameters)


async def test_auto_tool_choice_only_ever_emits_valid_calls_and_the_result_renders(engine):
    """SmolLM2's template has no tools slot: Troupe renders the hermes prompt and parses
    ``<tool_call>`` itself (vLLM's own parsers live in its HTTP server, not in AsyncLLM)."""
    for i, prompt in enumerate(TOOL_PROMPTS[:4]):
        text, outs = await run(engine, chat(f"auto{i}", prompt + " Use the tool.", tools=(WEATHER, ADD)))
        calls = merge_tool_call_deltas([d for o in outs for d in o.tool_calls or ()])
        for call in calls:
            spec = next(t for t in (WEATHER, ADD) if t.name == call.name)
            jsonschema.validate(json.loads(call.arguments), spec.parameters)
        assert "<tool_call>" not in text or not calls
        assert outs[-1].finish_reason in (("tool_calls",) if calls else ("stop", "length"))
    call = ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "celsius"}')
    history = [ChatMessage("user", "What's the weather in Paris?"),
               ChatMessage("assistant", "", tool_calls=(call,)),
               ChatMessage("tool", "18 degrees and sunny", tool_call_id="call_1")]
    final = GenerationRequest("auto-final", SamplingParams(temperature=0.0, max_tokens=30), messages=history,
                              tools=(WEATHER,), tool_choice="none")
    text, outs = await run(engine, final)
    assert text.strip() and not any(o.tool_calls for o in outs)


async def test_logprobs_with_top_logprobs(engine):
    question = "What is the capital of France?"
    text, outs = await run(engine, chat("lp", question, sampling={"max_tokens": 8, "logprobs": 3}))
    entries = [e for o in outs for e in o.logprobs or ()]
    tokens = sum(o.num_tokens for o in outs)
    assert len(entries) == tokens and tokens > 0
    assert "".join(e.token for e in entries if e.token_id != 2) == text  # 2: SmolLM2's EOS
    for e in entries:
        assert len(e.top) == 3 and e.logprob <= 0
        assert e.top[0][1] == e.token_id  # greedy: the pick is the most likely token
        assert [t[2] for t in e.top] == sorted((t[2] for t in e.top), reverse=True)
    _, none = await run(engine, chat("lp0", "Hi", sampling={"max_tokens": 4, "logprobs": 0}))
    assert all(e.top == () for o in none for e in o.logprobs or ())


async def test_n_choices_run_side_by_side_and_repeat_with_their_seeds(engine):
    """The gateway fans ``n`` out into seeded requests (``seed + i``) that vLLM batches.

    A choice repeats exactly when run again alone; batched with others its sampled text
    may differ (vLLM's CPU kernels are not batch-invariant: bfloat16 sums in another order
    move the probabilities slightly, and a sampled token can flip)."""
    base = chat("n", "Write one sentence about the sea.", sampling={"temperature": 1.0, "seed": 11, "max_tokens": 24})
    choices = fan_out(base, 3)

    async def run_choice(request):
        text, outs = await run(engine, request)
        return text, sum(o.num_tokens for o in outs), outs[-1].finish_reason

    together = await asyncio.gather(*(run_choice(c) for c in choices))
    assert [c.request_id for c in choices] == ["n-0", "n-1", "n-2"]
    assert len({text for text, _, _ in together}) == 3, together  # seed + i: the choices differ
    assert all(0 < tokens <= 24 and reason in ("stop", "length") for _, tokens, reason in together)
    alone = [await run_choice(c) for c in fan_out(base, 3)]
    assert [await run_choice(c) for c in fan_out(base, 3)] == alone


async def test_stop_strings_end_the_output_and_are_reported(engine):
    prompt = "Count from 1 to 20, separated by commas."
    full, _ = await run(engine, chat("full", prompt, sampling={"max_tokens": 40}))
    assert "5" in full, full
    stop = "5"
    text, outs = await run(engine, chat("stop", prompt, sampling={"max_tokens": 40, "stop": (stop, "twenty")}))
    assert full.startswith(text) and stop not in text
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_sequence == stop

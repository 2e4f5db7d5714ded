"""Continuous batching on the real bundled SmolLM2-135M (no Ray): batching changes no output.

Eight requests with different sampling parameters, stop strings and lengths run alone
first, then together (half of them joining a batch that is already decoding); each must
produce exactly the same text, finish reason and token count. Outputs are short so the
module stays under a minute on a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
import torch

from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams
from serve_app.settings import TransformersEngineConfig

pytestmark = [pytest.mark.models, pytest.mark.asyncio(loop_scope="module")]

CASES = [
    ("What is the capital of France?", dict(temperature=0.0, max_tokens=24)),
    ("Write a short poem about the sea.", dict(temperature=0.0, max_tokens=20, stop=("\n",))),
    ("Name three colors.", dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=16)),
    ("Tell me a joke about cats.", dict(temperature=0.0, max_tokens=9)),
    ("Explain gravity simply.", dict(temperature=1.0, seed=123, max_tokens=18, stop=("the",))),
    ("List 3 fruits.", dict(temperature=0.0, max_tokens=30, stop=("2.",))),
    ("How do I boil an egg?", dict(temperature=0.5, top_p=0.5, seed=99, max_tokens=12)),
    ("Say hello in Spanish.", dict(temperature=0.0, max_tokens=14)),
]


def request(i: int) -> GenerationRequest:
    prompt, sampling = CASES[i]
    return GenerationRequest(f"b{i}-{time.monotonic_ns()}", SamplingParams(**sampling),
                             messages=[ChatMessage("user", prompt)])


async def run(engine, req, started: asyncio.Event | None = None):
    text, tokens, last = [], 0, None
    async for out in engine.generate(req):
        text.append(out.text)
        tokens += out.num_tokens
        last = out
        if started is not None:
            started.set()
    return "".join(text), tokens, last.finish_reason, last.stop_sequence


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    torch.set_num_threads(1)
    from deployments.engines.transformers_cpu import TransformersTextEngine

    eng = TransformersTextEngine("smollm2", TransformersEngineConfig(num_threads=1, max_num_seqs=8))
    await eng.start()
    yield eng
    await eng.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def alone(engine):
    return [await run(engine, request(i)) for i in range(len(CASES))]


async def test_eight_streams_batched_equal_alone(engine, alone):
    first_token = asyncio.Event()
    early = [asyncio.create_task(run(engine, request(i), first_token)) for i in range(4)]
    await first_token.wait()  # the rest join a batch that is already decoding
    late = [asyncio.create_task(run(engine, request(i))) for i in range(4, 8)]
    together = await asyncio.gather(*early, *late)
    for i, (got, want) in enumerate(zip(together, alone)):
        assert got == want, f"case {i} differs when batched: {got!r} != {want!r}"
    assert {r[2] for r in alone} >= {"stop", "length"}  # stop strings and lengths both exercised
    assert engine.active_requests() == 0 and engine.queue_stats()["running"] == 0


async def test_cancel_one_mid_batch(engine, alone):
    before = engine.tokens_generated_total
    tasks = [asyncio.create_task(run(engine, request(i))) for i in (0, 5, 7)]
    victim = engine.generate(GenerationRequest(
        "victim", SamplingParams(temperature=0.0, max_tokens=200),
        messages=[ChatMessage("user", "Write a very long story about a dragon.")]))
    sent = 0
    for _ in range(3):
        sent += (await victim.__anext__()).num_tokens
    await victim.aclose()  # frees its slot before returning
    assert engine.queue_stats()["running"] <= 3
    results = await asyncio.gather(*tasks)
    assert results == [alone[0], alone[5], alone[7]]  # the others are intact
    victim_computed = engine.tokens_generated_total - before - sum(alone[i][1] for i in (0, 5, 7))
    # It stops at the next token boundary: at most the step in flight (and text held back
    # for an incomplete character) beyond what it was sent, never a long tail.
    assert sent <= victim_computed <= sent + 3
    assert engine.active_requests() == 0


async def test_second_turn_prefill_comes_from_the_prefix_cache():
    from deployments.engines.transformers_cpu import TransformersTextEngine

    eng = TransformersTextEngine(
        "smollm2", TransformersEngineConfig(num_threads=1, prefix_cache_tokens=4096))
    await eng.start()
    try:
        turn1 = [ChatMessage("user", "What is the capital of France?")]
        outs = [o async for o in eng.generate(GenerationRequest(
            "t1", SamplingParams(temperature=0.0, max_tokens=16), messages=turn1))]
        answer = "".join(o.text for o in outs)
        assert outs[-1].cached_tokens == 0
        turn2 = turn1 + [ChatMessage("assistant", answer), ChatMessage("user", "And of Italy?")]
        outs2 = [o async for o in eng.generate(GenerationRequest(
            "t2", SamplingParams(temperature=0.0, max_tokens=16), messages=turn2))]
        assert outs2[-1].cached_tokens >= outs[-1].prompt_tokens  # turn 1's prompt at least
        assert outs2[-1].cached_tokens < outs2[-1].prompt_tokens
        assert "".join(o.text for o in outs2)
    finally:
        await eng.shutdown()

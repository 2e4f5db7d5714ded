"""The transformers CPU engine on the real bundled SmolLM2-135M-Instruct (no Ray).

The engine is loaded once for the module. The first run on a machine converts the GGUF
into ~/.cache/troupe/models (about 20-70 s; ``make install`` does it ahead of time);
after that the load takes a second or two. Outputs are kept short so the module runs in
well under a minute on a busy 2-core machine.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
import torch

from serve_app.settings import TransformersEngineConfig
from serve_app.errors import ContextLengthExceeded
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams

pytestmark = [pytest.mark.models, pytest.mark.asyncio(loop_scope="module")]

FRANCE = [ChatMessage("user", "What is the capital of France?")]
STORY = [ChatMessage("user", "Write a very long story about a dragon who learns to cook.")]


def chat(rid: str, messages=FRANCE, **sampling) -> GenerationRequest:
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(rid, SamplingParams(**sampling), messages=list(messages))


async def collect(engine, request, lag_s: float = 0.0):
    """Run a request to the end: (text, outputs)."""
    outputs = []
    async for out in engine.generate(request):
        outputs.append(out)
        if lag_s:
            await asyncio.sleep(lag_s)  # a slow consumer: the engine keeps going
    return "".join(o.text for o in outputs), outputs


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    torch.set_num_threads(1)
    from deployments.engines.transformers_cpu import TransformersTextEngine

    # float32 weights: the exact answers below are fp32's (tests/models/test_batching.py
    # runs the default int8 weights).
    eng = TransformersTextEngine("smollm2", TransformersEngineConfig(num_threads=1, weights="float32"))
    await eng.start()
    yield eng
    await eng.shutdown()


async def test_capital_of_france(engine):
    text, outs = await collect(engine, chat("france"))
    assert "Paris" in text
    assert outs[-1].finish_reason == "stop"
    assert all(o.finish_reason is None for o in outs[:-1])
    assert engine.context_length == 8192
    assert outs[0].prompt_tokens > 10  # the chat template adds a system prompt
    assert engine.active_requests() == 0


async def test_stream_equals_non_stream_greedy(engine):
    fast_text, fast = await collect(engine, chat("fast", max_tokens=16))
    assert len(fast) > 1
    # A consumer that lags gets merged deltas, with the same text and the same token count.
    slow_text, slow = await collect(engine, chat("slow", max_tokens=16), lag_s=0.25)
    assert slow_text == fast_text
    assert sum(o.num_tokens for o in slow) == sum(o.num_tokens for o in fast)
    assert any(o.num_tokens > 1 for o in slow)
    # Plain (non-streaming) transformers greedy decoding gives the same text.
    ids = torch.tensor([engine.encode(chat("ref"))])
    with torch.inference_mode():
        out = engine._model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False
        )
    reference = engine._tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert fast_text == reference
    assert sum(o.num_tokens for o in fast) == out.shape[1] - ids.shape[1]


async def test_max_tokens_gives_length(engine):
    text, outs = await collect(engine, chat("len", STORY, max_tokens=5))
    assert outs[-1].finish_reason == "length"
    assert sum(o.num_tokens for o in outs) == 5
    assert text


async def test_cancel_mid_stream_frees_the_slot(engine):
    before = engine.tokens_generated_total
    stream = engine.generate(chat("cancel", STORY, max_tokens=200))
    for _ in range(3):
        out = await stream.__anext__()
        assert out.finish_reason is None
    assert engine.active_requests() == 1
    closed_at = time.monotonic()
    await stream.aclose()
    while engine.active_requests() and time.monotonic() - closed_at < 1.0:
        await asyncio.sleep(0.005)
    elapsed = time.monotonic() - closed_at
    assert engine.active_requests() == 0, "the worker did not stop within 1 s"
    produced = engine.tokens_generated_total - before
    assert produced < 10, f"generation went on after the close ({produced} tokens)"
    print(f"\ncancel: slot free {elapsed * 1000:.0f} ms after aclose; {produced} tokens computed")


async def test_abort_running_and_queued(engine):
    slots, engine._loop.max_num_seqs = engine._loop.max_num_seqs, 1  # one slot: the second waits
    try:
        running = engine.generate(chat("run", STORY, max_tokens=200))
        await running.__anext__()
        queued = engine.generate(chat("queued", STORY, max_tokens=200))
        queued_first = asyncio.ensure_future(queued.__anext__())
        await asyncio.sleep(0.05)
        assert engine.active_requests() == 2  # the queued request counts as active
        await engine.abort("queued")
        out = await asyncio.wait_for(queued_first, 1.0)
        assert (out.finish_reason, out.num_tokens) == ("abort", 0)
        await engine.abort("run")
        last = None
        async for last in running:
            pass
        assert last is not None and last.finish_reason == "abort"
        await asyncio.sleep(0)
        assert engine.active_requests() == 0
    finally:
        engine._loop.max_num_seqs = slots


async def test_stop_strings_are_trimmed(engine):
    text, outs = await collect(engine, chat("stop1", stop=("Paris",)))
    assert outs[-1].finish_reason == "stop"
    assert outs[-1].stop_sequence == "Paris"
    assert "Paris" not in text and text.rstrip().endswith("is")
    # A stop string spanning several tokens never leaks a prefix into the stream.
    text2, outs2 = await collect(engine, chat("stop2", stop=("of France",)))
    assert outs2[-1].finish_reason == "stop"
    assert text2 == text.split("of France")[0]
    assert "of" not in text2
    assert engine.active_requests() == 0


async def test_seeded_sampling_is_reproducible(engine):
    poem = [ChatMessage("user", "Write a short poem about the sea.")]
    req = lambda rid, seed: chat(rid, poem, temperature=0.8, top_p=0.95, seed=seed, max_tokens=12)
    first, _ = await collect(engine, req("s1", 1234))
    again, _ = await collect(engine, req("s2", 1234))
    assert first == again
    others = {(await collect(engine, req(f"s{seed}", seed)))[0] for seed in (1, 2)}
    assert others != {first}  # other seeds do sample differently


async def test_context_length_exceeded(engine):
    with pytest.raises(ContextLengthExceeded) as info:
        await collect(engine, chat("huge", max_tokens=1_000_000))
    assert info.value.param == "max_tokens"
    assert "8192" in info.value.message
    assert engine.active_requests() == 0


async def test_raw_prompt(engine):
    req = GenerationRequest("raw", SamplingParams(max_tokens=3, temperature=0), prompt="The capital of France is", raw=True)
    text, outs = await collect(engine, req)
    assert outs[0].prompt_tokens == len(engine._tokenizer("The capital of France is")["input_ids"])
    assert sum(o.num_tokens for o in outs) <= 3
    assert "Paris" in text


async def test_a_prompt_that_is_not_raw_is_one_user_turn(engine):
    prompt = "Tell me a short story about a robot."
    req = GenerationRequest("turn", SamplingParams(max_tokens=12, temperature=0), prompt=prompt)
    text, outs = await collect(engine, req)
    assert outs[0].prompt_tokens == len(engine.encode(chat("t", [ChatMessage("user", prompt)])))
    assert text.strip()  # as raw text the instruct model often stops at once

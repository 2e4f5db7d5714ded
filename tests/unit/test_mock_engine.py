"""Unit tests for the mock text engine: determinism, limits, stop strings, vLLM's delta contract."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional

import pytest

from deployments.engines.base import TextEngine
from deployments.engines.registry import create_text_engine
from deployments.engines.mock import MockTextEngine, mock_completion_tokens, render_prompt
from serve_app.settings import MockEngineConfig
from serve_app.errors import ContextLengthExceeded
from serve_app.protocol.internal import (
    ChatMessage,
    EngineOutput,
    GenerationRequest,
    SamplingParams,
)

PROMPT = "tell me about troupes"


def engine(**cfg: Any) -> MockTextEngine:
    cfg.setdefault("token_delay_ms", 0)
    return MockTextEngine("mock", MockEngineConfig(**cfg))


def request(
    prompt: str = PROMPT,
    *,
    request_id: str = "r1",
    max_tokens: Optional[int] = None,
    temperature: float = 1.0,
    seed: Optional[int] = None,
    stop: tuple[str, ...] = (),
) -> GenerationRequest:
    return GenerationRequest(
        request_id,
        SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed, stop=stop),
        prompt=prompt,
    )


async def collect(eng: MockTextEngine, req: GenerationRequest) -> list[EngineOutput]:
    return [out async for out in eng.generate(req)]


def text_of(outputs: list[EngineOutput]) -> str:
    return "".join(o.text for o in outputs)


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    """Wait for ``predicate`` with a deadline (the engine runs on this loop)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def test_the_mock_satisfies_the_engine_protocol_and_is_built_from_config() -> None:
    built = create_text_engine("m", MockEngineConfig(context_length=64))
    assert isinstance(built, MockTextEngine)
    assert isinstance(built, TextEngine)
    assert built.context_length == 64


def test_render_prompt_for_chat_and_raw_prompts() -> None:
    chat = GenerationRequest(
        "r", messages=[ChatMessage("system", "be brief"), ChatMessage("user", "hi")]
    )
    assert render_prompt(chat) == "<system> be brief\n<user> hi\n<assistant>"
    assert render_prompt(request("raw text")) == "raw text"


# ------------------------------------------------------------------ determinism


async def test_same_prompt_and_seed_give_the_same_output() -> None:
    first = await collect(engine(), request(seed=7, temperature=0.8))
    second = await collect(engine(), request(seed=7, temperature=0.8))
    assert text_of(first) == text_of(second)
    assert text_of(first)  # not trivially equal because empty


async def test_greedy_ignores_the_seed() -> None:
    a = await collect(engine(), request(seed=1, temperature=0))
    b = await collect(engine(), request(seed=2, temperature=0))
    c = await collect(engine(), request(seed=None, temperature=0))
    assert text_of(a) == text_of(b) == text_of(c)


async def test_different_seeds_differ_when_sampling() -> None:
    texts = {text_of(await collect(engine(), request(seed=s, temperature=0.7))) for s in range(4)}
    assert len(texts) == 4


async def test_different_prompts_differ() -> None:
    a = await collect(engine(), request("first prompt", temperature=0))
    b = await collect(engine(), request("second prompt", temperature=0))
    assert text_of(a) != text_of(b)


async def test_output_matches_mock_completion_tokens() -> None:
    outputs = await collect(engine(ignore_eos=True), request(max_tokens=12, temperature=0))
    assert text_of(outputs) == "".join(mock_completion_tokens(PROMPT, None, 0, 12))


# ------------------------------------------------------------ finish and limits


async def test_natural_answer_finishes_with_stop_within_configured_bounds() -> None:
    eng = engine(min_output_tokens=5, max_output_tokens=9)
    for seed in range(6):
        outputs = await collect(eng, request(seed=seed, max_tokens=100))
        assert outputs[-1].finish_reason == "stop"
        assert 5 <= sum(o.num_tokens for o in outputs) <= 9
        assert all(o.finish_reason is None for o in outputs[:-1])


async def test_max_tokens_below_natural_length_finishes_with_length() -> None:
    outputs = await collect(engine(min_output_tokens=20, max_output_tokens=30), request(max_tokens=3))
    assert outputs[-1].finish_reason == "length"
    assert sum(o.num_tokens for o in outputs) == 3
    assert len(text_of(outputs).split()) == 3


@pytest.mark.parametrize("max_tokens", [1, 4, 17])
async def test_max_tokens_is_respected(max_tokens: int) -> None:
    outputs = await collect(engine(min_output_tokens=40, max_output_tokens=48), request(max_tokens=max_tokens))
    assert sum(o.num_tokens for o in outputs) == max_tokens


async def test_ignore_eos_always_generates_max_tokens() -> None:
    eng = engine(ignore_eos=True, min_output_tokens=2, max_output_tokens=3)
    outputs = await collect(eng, request(max_tokens=40))
    assert sum(o.num_tokens for o in outputs) == 40
    assert outputs[-1].finish_reason == "length"


async def test_prompt_tokens_are_on_every_output() -> None:
    eng = engine(token_delay_ms=1, ignore_eos=True)
    outputs = await collect(eng, request("one two three four", max_tokens=5))
    assert {o.prompt_tokens for o in outputs} == {4}


# ---------------------------------------------------------------- stop strings


async def _full_text(max_tokens: int = 30) -> str:
    return text_of(await collect(engine(ignore_eos=True), request(max_tokens=max_tokens, temperature=0)))


async def test_stop_string_trims_the_output_before_it() -> None:
    full = await _full_text()
    words = full.split()
    stop = words[4]  # a whole word: the cut falls inside one token (after its space)
    expected = full[: full.find(stop)]

    outputs = await collect(
        engine(ignore_eos=True), request(max_tokens=30, temperature=0, stop=(stop,))
    )

    assert text_of(outputs) == expected
    assert stop not in text_of(outputs)
    assert outputs[-1].finish_reason == "stop"


async def test_earliest_of_several_stop_strings_wins() -> None:
    full = await _full_text()
    words = full.split()
    early, late = words[2], words[6]
    if full.find(early) > full.find(late):
        early, late = late, early
    outputs = await collect(
        engine(ignore_eos=True), request(max_tokens=30, temperature=0, stop=(late, early))
    )
    assert text_of(outputs) == full[: full.find(early)]
    assert outputs[-1].stop_sequence == early  # the string that matched is reported


async def test_absent_stop_string_changes_nothing() -> None:
    full = await _full_text()
    outputs = await collect(
        engine(ignore_eos=True), request(max_tokens=30, temperature=0, stop=("zzz-not-there",))
    )
    assert text_of(outputs) == full
    assert outputs[-1].finish_reason == "length"


async def test_stop_string_spanning_two_tokens_is_trimmed() -> None:
    full = await _full_text()
    words = full.split()
    stop = f"{words[1][-1]} {words[2]}"  # last letter of word 1, the space, word 2
    expected = full[: full.find(stop)]

    outputs = await collect(
        engine(ignore_eos=True), request(max_tokens=30, temperature=0, stop=(stop,))
    )

    assert text_of(outputs) == expected


# ------------------------------------------------------------- context length


async def test_prompt_longer_than_the_context_is_rejected() -> None:
    eng = engine(context_length=16)
    with pytest.raises(ContextLengthExceeded) as exc:
        await collect(eng, request(" ".join(["word"] * 20)))
    assert exc.value.status == 400
    assert exc.value.details == {"context_length": 16, "prompt_tokens": 20}
    assert eng.active_requests() == 0


async def test_max_tokens_beyond_the_room_left_is_rejected() -> None:
    eng = engine(context_length=16)
    with pytest.raises(ContextLengthExceeded) as exc:
        await collect(eng, request("four words of prompt", max_tokens=13))
    assert exc.value.param == "max_tokens"
    assert "at most 12" in exc.value.message
    outputs = await collect(eng, request("four words of prompt", max_tokens=12))
    assert sum(o.num_tokens for o in outputs) <= 12


# ------------------------------------------------------ streaming and aborts


async def test_a_lagging_consumer_receives_merged_deltas() -> None:
    eng = engine(token_delay_ms=2, ignore_eos=True)
    outputs: list[EngineOutput] = []
    async for out in eng.generate(request(max_tokens=40, temperature=0)):
        outputs.append(out)
        await asyncio.sleep(0.02)  # a slow reader: ~10 tokens pile up between reads

    assert any(o.num_tokens > 1 for o in outputs)
    assert sum(o.num_tokens for o in outputs) == 40
    assert text_of(outputs) == "".join(mock_completion_tokens(PROMPT, None, 0, 40))
    assert outputs[-1].finish_reason == "length"
    assert len(outputs) < 40


async def test_a_reader_that_keeps_up_receives_the_answer_in_several_deltas() -> None:
    eng = engine(token_delay_ms=10, ignore_eos=True)
    outputs = await collect(eng, request(max_tokens=5))
    # The engine runs on a clock, so deltas may merge when the loop was late, but a reader
    # that keeps up must not get the whole answer in one piece.
    assert sum(o.num_tokens for o in outputs) == 5
    assert len(outputs) >= 2


async def test_active_requests_counts_running_streams() -> None:
    eng = engine(token_delay_ms=5, ignore_eos=True)
    first = eng.generate(request(request_id="a", max_tokens=500))
    second = eng.generate(request(request_id="b", max_tokens=500))
    await first.__anext__()
    await second.__anext__()
    assert eng.active_requests() == 2

    await first.aclose()
    assert eng.active_requests() == 1
    await second.aclose()
    assert eng.active_requests() == 0


async def test_closing_the_stream_aborts_the_request() -> None:
    eng = engine(token_delay_ms=5, ignore_eos=True)
    stream = eng.generate(request(max_tokens=1000))
    await stream.__anext__()
    assert eng.active_requests() == 1

    await stream.aclose()

    assert eng.active_requests() == 0


async def test_cancelling_the_consumer_task_aborts_the_request() -> None:
    eng = engine(token_delay_ms=5, ignore_eos=True)

    async def consume() -> None:
        async for _ in eng.generate(request(max_tokens=1000)):
            pass

    task = asyncio.ensure_future(consume())
    await eventually(lambda: eng.active_requests() == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert eng.active_requests() == 0


async def test_abort_by_request_id_ends_the_stream_with_abort() -> None:
    eng = engine(token_delay_ms=5, ignore_eos=True)
    stream = eng.generate(request(request_id="to-abort", max_tokens=1000))
    first = await stream.__anext__()
    assert first.finish_reason is None

    await eng.abort("to-abort")
    rest = [out async for out in stream]

    assert rest, "the stream must end with an explicit abort output"
    assert rest[-1].finish_reason == "abort"
    assert sum(o.num_tokens for o in [first, *rest]) < 1000
    assert eng.active_requests() == 0


async def test_abort_of_an_unknown_request_is_a_no_op() -> None:
    eng = engine()
    await eng.abort("never-started")
    outputs = await collect(eng, request(max_tokens=3))
    assert outputs[-1].finish_reason in ("stop", "length")


async def test_shutdown_aborts_running_requests() -> None:
    eng = engine(token_delay_ms=5, ignore_eos=True)
    stream = eng.generate(request(max_tokens=1000))
    await stream.__anext__()
    await eng.shutdown()
    rest = [out async for out in stream]
    assert rest[-1].finish_reason == "abort"
    assert eng.active_requests() == 0


@pytest.mark.parametrize("token_delay_ms", [0, 2])
async def test_fail_after_tokens_raises_after_that_many_tokens(token_delay_ms: float) -> None:
    eng = engine(token_delay_ms=token_delay_ms, ignore_eos=True, fail_after_tokens=3)
    received: list[EngineOutput] = []
    with pytest.raises(RuntimeError, match="after 3 tokens"):
        async for out in eng.generate(request(max_tokens=20, temperature=0)):
            received.append(out)

    assert sum(o.num_tokens for o in received) == 3
    assert text_of(received) == "".join(mock_completion_tokens(PROMPT, None, 0, 3))
    assert all(o.finish_reason is None for o in received)
    assert eng.active_requests() == 0


async def test_fail_after_zero_tokens_fails_before_any_output() -> None:
    eng = engine(fail_after_tokens=0)
    stream = eng.generate(request(max_tokens=5))
    with pytest.raises(RuntimeError):
        await stream.__anext__()
    assert eng.active_requests() == 0


async def test_fail_after_more_tokens_than_generated_never_fails() -> None:
    eng = engine(ignore_eos=True, fail_after_tokens=10)
    outputs = await collect(eng, request(max_tokens=5))
    assert outputs[-1].finish_reason == "length"


async def test_first_token_delay_holds_back_the_first_token() -> None:
    eng = engine(token_delay_ms=1, first_token_delay_ms=150)
    started = time.monotonic()
    stream = eng.generate(request(max_tokens=3))
    await stream.__anext__()
    assert time.monotonic() - started >= 0.14
    await stream.aclose()


async def test_first_token_delay_applies_with_zero_token_delay() -> None:
    eng = engine(token_delay_ms=0, first_token_delay_ms=150)
    started = time.monotonic()
    stream = eng.generate(request(max_tokens=3))
    await stream.__anext__()
    elapsed = time.monotonic() - started
    await stream.aclose()
    assert elapsed >= 0.14

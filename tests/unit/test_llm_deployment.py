"""Unit tests for LLMDeployment as a plain class (no Ray) over the mock engine."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, AsyncIterator, Callable, Optional

import pytest

from deployments.engines.mock import MockTextEngine, mock_completion_tokens
from deployments.llm import LLMDeployment
from serve_app.settings import MockEngineConfig, ModelConfig
from serve_app.errors import ContextLengthExceeded, InferenceFailed
from serve_app.protocol.internal import (
    ChatMessage,
    EngineOutput,
    GenerationRequest,
    SamplingParams,
    TextChunk,
)


def deployment(default_max_tokens: int = 256, model_id: str = "mock-unit", **engine: Any) -> LLMDeployment:
    engine.setdefault("token_delay_ms", 0)
    return LLMDeployment(
        ModelConfig(
            id=model_id,
            engine=MockEngineConfig(**engine),
            default_max_tokens=default_max_tokens,
        )
    )


def chat(
    text: str = "hello there",
    *,
    request_id: str = "r1",
    max_tokens: Optional[int] = None,
    temperature: float = 0.0,
) -> GenerationRequest:
    return GenerationRequest(
        request_id,
        SamplingParams(max_tokens=max_tokens, temperature=temperature),
        messages=[ChatMessage("user", text)],
    )


async def collect(stream: AsyncIterator[TextChunk]) -> list[TextChunk]:
    return [chunk async for chunk in stream]


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


class EndsWithoutFinishEngine:
    """A broken engine: its stream ends without a finish reason."""

    context_length = 64

    def __init__(self) -> None:
        self.started = 0
        self.closed = 0

    async def start(self) -> None:
        self.started += 1

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineOutput]:
        try:
            yield EngineOutput("partial", 1, 3)
        finally:
            self.closed += 1

    async def abort(self, request_id: str) -> None:
        return None

    def active_requests(self) -> int:
        return 0

    async def shutdown(self) -> None:
        return None


# -------------------------------------------------------------------- streaming


async def test_stream_ends_with_finish_reason_and_exact_usage() -> None:
    dep = deployment(token_delay_ms=1)
    chunks = await collect(dep.stream(chat(max_tokens=100)))

    last = chunks[-1]
    assert last.finish_reason in ("stop", "length")
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert last.prompt_tokens == len("<user> hello there\n<assistant>".split())
    assert last.completion_tokens == sum(c.num_tokens for c in chunks)
    assert last.completion_tokens > 0
    assert all(c.prompt_tokens == last.prompt_tokens for c in chunks)


async def test_stream_with_a_lagging_reader_still_counts_every_token() -> None:
    dep = deployment(token_delay_ms=2, ignore_eos=True)
    chunks: list[TextChunk] = []
    async for chunk in dep.stream(chat(max_tokens=30)):
        chunks.append(chunk)
        await asyncio.sleep(0.01)  # a slow reader, so engine deltas merge

    assert any(c.num_tokens > 1 for c in chunks)
    assert chunks[-1].completion_tokens == 30 == sum(c.num_tokens for c in chunks)
    assert chunks[-1].finish_reason == "length"


async def test_complete_returns_the_concatenated_stream_text() -> None:
    dep = deployment()
    streamed = await collect(dep.stream(chat(request_id="s", max_tokens=40)))
    result = await dep.complete(chat(request_id="c", max_tokens=40))

    assert result.text == "".join(c.text for c in streamed)
    assert result.finish_reason == streamed[-1].finish_reason
    assert result.completion_tokens == streamed[-1].completion_tokens == result.num_tokens
    assert result.prompt_tokens == streamed[-1].prompt_tokens


async def test_complete_text_is_the_engines_tokens() -> None:
    dep = deployment(ignore_eos=True)
    result = await dep.complete(chat(max_tokens=6))
    prompt = "<user> hello there\n<assistant>"
    assert result.text == "".join(mock_completion_tokens(prompt, None, 0.0, 6))
    assert result.finish_reason == "length"


async def test_default_max_tokens_applies_when_the_request_sets_none() -> None:
    dep = deployment(default_max_tokens=5, min_output_tokens=20, max_output_tokens=30)
    result = await dep.complete(chat(max_tokens=None))

    assert result.completion_tokens == 5
    assert result.finish_reason == "length"


async def test_default_max_tokens_is_capped_by_the_room_the_prompt_leaves() -> None:
    # Only an explicit max_tokens that does not fit is an error; the default shrinks.
    dep = deployment(default_max_tokens=256, context_length=32, ignore_eos=True)
    prompt = " ".join(["word"] * 20)  # 22 prompt tokens with the chat tags: room for 10
    result = await dep.complete(chat(prompt, max_tokens=None))

    assert result.prompt_tokens == 22
    assert result.completion_tokens == 10
    assert result.finish_reason == "length"
    with pytest.raises(ContextLengthExceeded):
        await dep.complete(chat(prompt, max_tokens=11))


async def test_an_explicit_max_tokens_wins_over_the_default() -> None:
    dep = deployment(default_max_tokens=5, ignore_eos=True)
    result = await dep.complete(chat(max_tokens=9))
    assert result.completion_tokens == 9


# ----------------------------------------------------------------------- errors


async def test_an_engine_crash_becomes_inference_failed() -> None:
    dep = deployment(fail_after_tokens=2, ignore_eos=True)
    received: list[TextChunk] = []
    with pytest.raises(InferenceFailed) as exc:
        async for chunk in dep.stream(chat(max_tokens=20)):
            received.append(chunk)

    assert sum(c.num_tokens for c in received) == 2
    assert "mock-unit" in exc.value.message
    assert "configured" not in exc.value.message  # the engine's own text stays in the logs
    assert exc.value.details == {"exception": "RuntimeError"}
    assert dep.engine.active_requests() == 0


async def test_an_engine_crash_in_complete_becomes_inference_failed() -> None:
    dep = deployment(fail_after_tokens=0)
    with pytest.raises(InferenceFailed):
        await dep.complete(chat(max_tokens=5))
    assert dep.engine.active_requests() == 0


async def test_troupe_errors_from_the_engine_pass_through() -> None:
    dep = deployment(context_length=16)
    with pytest.raises(ContextLengthExceeded):
        await dep.complete(chat(" ".join(["long"] * 30)))


async def test_a_stream_without_finish_reason_is_inference_failed() -> None:
    fake = EndsWithoutFinishEngine()
    dep = LLMDeployment(ModelConfig(id="broken", engine=MockEngineConfig()), engine=fake)
    with pytest.raises(InferenceFailed, match="without a finish reason"):
        await collect(dep.stream(chat()))
    assert fake.closed == 1


# ----------------------------------------------------------------- cancellation


async def test_closing_the_stream_midway_aborts_the_engine_request() -> None:
    dep = deployment(token_delay_ms=5, ignore_eos=True)
    stream = dep.stream(chat(max_tokens=1000))
    await stream.__anext__()
    assert dep.engine.active_requests() == 1

    await stream.aclose()

    assert dep.engine.active_requests() == 0


async def test_cancelling_the_consumer_task_aborts_the_engine_request() -> None:
    dep = deployment(token_delay_ms=5, ignore_eos=True)

    async def consume() -> None:
        async for _ in dep.stream(chat(max_tokens=1000)):
            pass

    task = asyncio.ensure_future(consume())
    await eventually(lambda: dep.engine.active_requests() == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert dep.engine.active_requests() == 0


async def test_engine_abort_finishes_as_cancelled_with_usage() -> None:
    dep = deployment(token_delay_ms=5, ignore_eos=True)
    stream = dep.stream(chat(request_id="abort-me", max_tokens=1000))
    chunks = [await stream.__anext__()]

    await dep.engine.abort("abort-me")
    chunks += await collect(stream)

    last = chunks[-1]
    assert last.finish_reason == "cancelled"
    assert last.completion_tokens == sum(c.num_tokens for c in chunks)
    assert 0 < last.completion_tokens < 1000
    assert dep.engine.active_requests() == 0


async def test_complete_frees_the_engine_slot_before_returning() -> None:
    # Returning from inside ``async for`` must close the stream at once, not when the
    # garbage collector gets to it: /health would otherwise count finished requests.
    dep = deployment(ignore_eos=True)
    await dep.complete(chat(max_tokens=3))
    assert dep.engine.active_requests() == 0


# ------------------------------------------------------------------------ stats


async def test_stats_report_engine_side_state() -> None:
    dep = deployment(context_length=2048, token_delay_ms=5, ignore_eos=True)
    before = dep.stats()
    assert before == {
        "model": "mock-unit",
        "active_requests": 0,
        "served_requests": 0,
        "context_length": 2048,
        "engine": "mock",
        "started": False,
        "pid": os.getpid(),
        "queue": {"queue_depth": 0, "running": 0, "expected_wait_s": 0.0},
    }

    stream = dep.stream(chat(max_tokens=1000))
    await stream.__anext__()
    during = dep.stats()
    await stream.aclose()

    assert during["active_requests"] == 1
    assert during["queue"]["running"] == 1  # the mock never queues: it runs what it gets
    assert during["served_requests"] == 1
    assert during["started"] is True
    assert dep.stats()["active_requests"] == 0


async def test_engine_starts_once_even_under_concurrent_first_requests() -> None:
    fake = EndsWithoutFinishEngine()
    dep = LLMDeployment(ModelConfig(id="m", engine=MockEngineConfig()), engine=fake)
    await asyncio.gather(dep.start(), dep.check_health(), dep.start())
    assert fake.started == 1
    assert dep.stats()["started"] is True


async def test_deployment_accepts_the_dict_form_of_its_config() -> None:
    dep = LLMDeployment({"id": "from-dict", "engine": {"type": "mock", "token_delay_ms": 0}})
    assert isinstance(dep.engine, MockTextEngine)
    result = await dep.complete(chat(max_tokens=2))
    assert result.completion_tokens == 2


async def test_shutdown_aborts_running_requests() -> None:
    dep = deployment(token_delay_ms=5, ignore_eos=True)
    stream = dep.stream(chat(max_tokens=1000))
    await stream.__anext__()
    await dep.shutdown()
    rest = await collect(stream)
    assert rest[-1].finish_reason == "cancelled"
    assert dep.engine.active_requests() == 0

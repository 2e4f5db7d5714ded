"""The batching bench's staggered closed loop: users join out of step, one after another."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("torch")

from bench import batch_bench  # noqa: E402


class StepEngine:
    """Every live stream gets one token per event-loop turn (a loop step of the engine)."""

    def __init__(self) -> None:
        self.log: list[tuple[str, str, int]] = []  # (event, topic, tokens streamed so far)

    async def generate(self, request):
        topic = next(t for t in batch_bench.TOPICS if t in request.messages[0].content)
        self.log.append(("start", topic, 0))
        for n in range(1, request.sampling.max_tokens + 1):
            await asyncio.sleep(0)
            self.log.append(("token", topic, n))
            yield SimpleNamespace(num_tokens=1)


def test_staggered_users_join_once_the_one_before_has_streamed_its_share():
    engine = StepEngine()
    row = asyncio.run(batch_bench.staggered_loop(engine, 4, 16, 3))
    starts = [i for i, (event, _, _) in enumerate(engine.log) if event == "start"]
    first_of = {}
    for i in starts:
        first_of.setdefault(engine.log[i][1], i)
    order = sorted(first_of, key=first_of.get)
    assert order == batch_bench.TOPICS[:4]  # users join in turn
    for before, after in zip(order, order[1:]):
        streamed = [n for event, topic, n in engine.log[: first_of[after]] if topic == before and event == "token"]
        assert streamed and max(streamed) >= 16 // 4  # its share (max_tokens / c) came first
    assert row["shape"] == "staggered" and row["concurrency"] == 4
    assert 0 < row["output_tokens"] < 4 * 3 * 16  # the steady window only, not the ramps
    assert row["tokens_per_s"] > 0 and row["ttft_p50_s"] >= 0

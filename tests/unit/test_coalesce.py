"""serve_app.gateway.coalesce.Coalescer: concurrent items merge into batch calls, without a timer;
bad items fail alone; a failed call fails its items; abandoned items are dropped."""

from __future__ import annotations

import asyncio

import pytest

from serve_app.gateway.coalesce import Coalescer
from serve_app.errors import InvalidRequest


class Upstream:
    """A batch callee that records each call and can be held open."""

    def __init__(self) -> None:
        self.calls: list[list[object]] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.fail: BaseException | None = None

    async def __call__(self, items: list[object]) -> list[object]:
        self.calls.append(list(items))
        await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        return [InvalidRequest(f"bad {x}") if x == "bad" else f"ok {x}" for x in items]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _busy(**options: object) -> tuple[Upstream, Coalescer, list[asyncio.Task]]:
    """A merger with its one call slot held open by item "h" (``up.gate`` releases it),
    and a helper that queues more items behind it."""
    up = Upstream()
    up.gate.clear()
    merger = Coalescer(up, **{"max_weight": 8, "max_in_flight": 1, **options})  # type: ignore[arg-type]
    hold = asyncio.create_task(merger.submit("h"))
    await _settle()
    return up, merger, [hold]


async def _queue(merger: Coalescer, items: list) -> list[asyncio.Task]:
    tasks = [asyncio.create_task(merger.submit(x)) for x in items]
    await _settle()
    return tasks


async def test_lone_item_leaves_at_once() -> None:
    up = Upstream()
    merger = Coalescer(up, max_weight=8, max_in_flight=2)
    async with asyncio.timeout(1):
        assert await merger.submit("a") == "ok a"
    assert up.calls == [["a"]]


async def test_items_queued_while_busy_leave_together() -> None:
    up, merger, hold = await _busy()
    rest = await _queue(merger, list("bcdef"))
    assert up.calls == [["h"]] and merger.queued == 5 and merger.in_flight == 1
    up.gate.set()
    async with asyncio.timeout(1):
        results = await asyncio.gather(*hold, *rest)
    assert results == [f"ok {x}" for x in "hbcdef"]
    assert up.calls == [["h"], list("bcdef")]
    assert (merger.calls, merger.items, merger.largest) == (2, 6, 5)


async def test_weight_caps_a_call_and_a_heavy_item_goes_alone() -> None:
    up, merger, hold = await _busy(max_weight=4, weight=len)
    tasks = await _queue(merger, ["aa", "bb", "cc", "dddddd", "e"])
    up.gate.set()
    async with asyncio.timeout(1):
        await asyncio.gather(*hold, *tasks)
    assert up.calls == [["h"], ["aa", "bb"], ["cc"], ["dddddd"], ["e"]]


async def test_a_bad_item_fails_alone() -> None:
    up, merger, hold = await _busy()
    tasks = await _queue(merger, ["x", "bad", "y"])
    up.gate.set()
    async with asyncio.timeout(1):
        out = await asyncio.gather(*hold, *tasks, return_exceptions=True)
    assert out[0] == "ok h" and out[1] == "ok x" and out[3] == "ok y"
    assert isinstance(out[2], InvalidRequest) and "bad" in str(out[2])
    assert up.calls[1] == ["x", "bad", "y"]


async def test_a_failed_call_fails_each_item_with_its_own_error() -> None:
    up = Upstream()
    up.fail = InvalidRequest("upstream said no", param="input")
    merger = Coalescer(up, max_weight=8, max_in_flight=1)
    up.gate.clear()
    tasks = [asyncio.create_task(merger.submit(x)) for x in "abc"]
    await _settle()
    up.gate.set()
    async with asyncio.timeout(1):
        out = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(e, InvalidRequest) and e.param == "input" for e in out)
    out[1].metered = True  # one caller marking its error leaves the others' alone
    assert not out[2].metered
    assert merger.in_flight == 0
    up.fail = None
    async with asyncio.timeout(1):
        assert await merger.submit("d") == "ok d"  # the merger still works


async def test_an_abandoned_item_is_dropped_and_others_proceed() -> None:
    up, merger, hold = await _busy()
    gone, kept = await _queue(merger, ["gone", "kept"])
    gone.cancel()
    await _settle()
    up.gate.set()
    async with asyncio.timeout(1):
        assert await kept == "ok kept"
        await hold[0]
    assert up.calls == [["h"], ["kept"]]
    assert gone.cancelled()


async def test_a_result_count_mismatch_fails_the_call() -> None:
    async def short(items: list[object]) -> list[object]:
        return items[:-1]

    merger = Coalescer(short, max_weight=8, max_in_flight=1)
    async with asyncio.timeout(1):
        out = await asyncio.gather(*(merger.submit(x) for x in "abc"), return_exceptions=True)
    # "a" left alone, "b" and "c" together: every item of both calls failed
    assert [str(e) for e in out] == ["batch call answered 0 results for 1 items"] + [
        "batch call answered 1 results for 2 items"] * 2


def test_limits_must_be_positive() -> None:
    with pytest.raises(ValueError):
        Coalescer(Upstream(), max_weight=0, max_in_flight=1)
    with pytest.raises(ValueError):
        Coalescer(Upstream(), max_weight=1, max_in_flight=0)


def test_default_merge_in_flight_keeps_autoscaling_informed() -> None:
    from serve_app.settings import ModelConfig
    from serve_app.gateway.modalities import default_merge_in_flight

    def model(deployment: dict) -> ModelConfig:
        return ModelConfig.model_validate({"id": "e", "modality": "embeddings",
                                           "engine": {"type": "mock"}, "deployment": deployment})

    assert default_merge_in_flight(model({})) == 2
    assert default_merge_in_flight(model({"num_replicas": 3})) == 6
    # autoscaled: enough calls to reach the target on every replica, or Serve would never
    # see more than a few ongoing requests and never scale up
    scaled = model({"autoscaling": {"min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 64}})
    assert default_merge_in_flight(scaled) == 256
    small = model({"autoscaling": {"min_replicas": 1, "max_replicas": 1, "target_ongoing_requests": 1}})
    assert default_merge_in_flight(small) == 2

"""MetricsRecorder: batching, size-triggered flushes, retries in order, bounded buffer, cost."""

from __future__ import annotations

import asyncio
import time
from typing import Callable

import pytest

from actors.recorder import MetricsRecorder
from serve_app.protocol.metrics import RequestEvent


def ev(i: int) -> RequestEvent:
    return RequestEvent(event_id=f"e{i}", ts=1.0, model="m", route="/v1/chat/completions")


async def until(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    """Wait for ``predicate`` with a deadline (polls the loop; no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


class Sink:
    """Records delivered batches; fails the first ``fail`` calls."""

    def __init__(self, fail: int = 0) -> None:
        self.fail = fail
        self.calls = 0
        self.batches: list[list[str]] = []

    async def __call__(self, events: list[RequestEvent]) -> int:
        self.calls += 1
        if self.calls <= self.fail:
            raise ConnectionError("actor unavailable")
        self.batches.append([e.event_id for e in events])
        return len(events)

    @property
    def delivered(self) -> list[str]:
        return [i for batch in self.batches for i in batch]


async def test_events_are_batched_on_the_interval() -> None:
    sink = Sink()
    rec = MetricsRecorder(sink, flush_interval_s=0.05)
    for i in range(10):
        rec.record(ev(i))
    assert sink.calls == 0  # nothing is sent on the request path
    await until(lambda: len(sink.delivered) == 10)
    assert sink.batches == [[f"e{i}" for i in range(10)]]
    await rec.close()


async def test_a_full_batch_flushes_without_waiting_for_the_interval() -> None:
    sink = Sink()
    rec = MetricsRecorder(sink, flush_interval_s=3600, max_batch=4)
    for i in range(9):
        rec.record(ev(i))
    await until(lambda: len(sink.delivered) >= 8, timeout=2.0)
    assert sink.batches[:2] == [["e0", "e1", "e2", "e3"], ["e4", "e5", "e6", "e7"]]
    await rec.close()
    assert sink.delivered == [f"e{i}" for i in range(9)]  # close() sends the remainder


async def test_sink_failures_are_retried_without_loss_in_order() -> None:
    sink = Sink(fail=3)
    rec = MetricsRecorder(sink, flush_interval_s=0.01, max_batch=4, initial_backoff_s=0.01,
                          max_backoff_s=0.04)
    for i in range(6):
        rec.record(ev(i))
    await until(lambda: len(sink.delivered) == 6)
    for i in range(6, 10):  # more traffic after the outage
        rec.record(ev(i))
    await until(lambda: len(sink.delivered) == 10)
    assert sink.delivered == [f"e{i}" for i in range(10)]
    stats = rec.stats()
    assert (stats["failures"], stats["sent"], stats["dropped"], stats["buffered"]) == (3, 10, 0, 0)
    assert stats["backoff_s"] == 0.0 and "actor unavailable" in stats["last_error"]
    await rec.close()


async def test_flush_raises_and_keeps_the_failed_batch_in_front() -> None:
    sink = Sink(fail=1)
    rec = MetricsRecorder(sink, flush_interval_s=3600, max_batch=3)
    await rec.close()  # no background task: this test drives flush() by hand
    for i in range(5):
        rec.record(ev(i))
    with pytest.raises(ConnectionError):
        await rec.flush()
    assert rec.stats()["buffered"] == 5
    assert await rec.flush() == 5
    assert sink.batches == [["e0", "e1", "e2"], ["e3", "e4"]]


def test_bounded_buffer_drops_the_oldest_and_counts_them() -> None:
    sink = Sink()
    rec = MetricsRecorder(sink, max_batch=2, max_buffer=5)
    for i in range(8):  # no running loop here: nothing is flushed in the background
        rec.record(ev(i))
    stats = rec.stats()
    assert (stats["buffered"], stats["dropped"], stats["recorded"]) == (5, 3, 8)
    assert asyncio.run(rec.flush()) == 5
    assert sink.delivered == ["e3", "e4", "e5", "e6", "e7"]


async def test_failed_batch_that_no_longer_fits_drops_the_oldest() -> None:
    sink = Sink()
    recorder: list[MetricsRecorder] = []

    async def first_call_fails(events: list[RequestEvent]) -> int:
        if sink.calls == 0:
            sink.calls += 1
            for i in range(4, 7):  # traffic arrives while the batch is in flight
                recorder[0].record(ev(i))
            raise ConnectionError("down")
        return await sink(events)

    rec = MetricsRecorder(first_call_fails, flush_interval_s=3600, max_batch=3, max_buffer=4)
    recorder.append(rec)
    await rec.close()
    for i in range(4):
        rec.record(ev(i))
    with pytest.raises(ConnectionError):
        await rec.flush()
    # Buffer: e3 + e4..e6 arrived; the failed e0..e2 went back in front and overflowed.
    assert rec.stats()["dropped"] == 3 and rec.stats()["buffered"] == 4
    await rec.flush()
    assert sink.delivered == ["e3", "e4", "e5", "e6"]


async def test_gauges_are_sent_when_changed() -> None:
    sent: list[list] = []

    async def gauge_sink(samples: list) -> None:
        sent.append(samples)

    rec = MetricsRecorder(Sink(), flush_interval_s=0.01, gauge_sink=gauge_sink,
                          gauge_refresh_s=3600)
    await rec.start()
    rec.set_gauge("in_flight_requests", {"deployment": "LLM_a"}, 2)
    await until(lambda: len(sent) == 1)
    rec.set_gauge("in_flight_requests", {"deployment": "LLM_a"}, 2)  # unchanged: not resent
    rec.set_gauge("in_flight_requests", {"deployment": "LLM_b"}, 1)
    await until(lambda: len(sent) == 2)
    assert sorted(sent[1], key=lambda s: s[1]["deployment"]) == [
        ("in_flight_requests", {"deployment": "LLM_a"}, 2),
        ("in_flight_requests", {"deployment": "LLM_b"}, 1),
    ]
    await rec.close()


def test_record_costs_about_a_microsecond() -> None:
    rec = MetricsRecorder(Sink(), max_batch=256, max_buffer=300_000)
    events = [ev(i) for i in range(100_000)]
    start = time.process_time()
    for event in events:
        rec.record(event)
    per_call_us = (time.process_time() - start) / len(events) * 1e6
    assert per_call_us < 10, f"record() took {per_call_us:.2f} us per call"


async def test_an_idle_recorder_does_not_wake_until_an_event_arrives() -> None:
    sink = Sink()
    rec = MetricsRecorder(sink, flush_interval_s=0.005)
    drains = 0
    real_drain = rec._drain

    async def counting_drain() -> int:
        nonlocal drains
        drains += 1
        return await real_drain()

    rec._drain = counting_drain  # type: ignore[method-assign]
    await rec.start()
    await asyncio.sleep(0.2)  # forty flush intervals with nothing to send
    assert drains == 0
    rec.record(ev(1))
    await until(lambda: sink.delivered == ["e1"])
    await asyncio.sleep(0.2)  # idle again after the flush
    assert drains == 1
    await rec.close()

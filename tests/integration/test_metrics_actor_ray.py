"""The metrics actor under real Ray: killed mid-stream, it restarts and counts every event once.

The actor is created the way the app builder creates it (named, detached, restartable,
tasks retried), on a SQLite ledger in ``tmp_path``. Events go through the production path:
``MetricsRecorder`` -> ``actor_sink`` -> ``MetricsActor.record``. The sink's timeout
(0.1 s) is shorter than a restart, so batches sent while the actor restarts time out and
are re-sent by the recorder while Ray also retries the original task: the ledger must
still hold each event exactly once.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Callable

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import MetricsActor
from actors.recorder import MetricsRecorder, actor_sink
from serve_app.protocol.metrics import RequestEvent

pytest.importorskip("serve_app.store.sqlite")

PRICES = {"local-llm": {"input_usd_per_million": 0.5, "output_usd_per_million": 1.5}}
N_EVENTS = 600


def ev(i: int) -> RequestEvent:
    return RequestEvent(
        event_id=f"req-{i}", ts=1000.0 + i, model="local-llm", route="/v1/chat/completions",
        prompt_tokens=10 + i % 7, completion_tokens=1 + i % 5, ttft_ms=5.0 + i % 11,
        e2e_ms=20.0 + i % 13, inter_token_ms=[1.0, 2.0],
    )


async def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def counter_total(text: bytes, name: str, **labels: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text.decode())
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def test_killed_actor_restarts_with_every_event_counted_once(serve_instance, tmp_path):
    import ray

    name = f"troupe-metrics-test-{uuid.uuid4().hex[:8]}"  # not the app's actor
    actor = ray.remote(MetricsActor).options(
        name=name, namespace="troupe", lifetime="detached", max_restarts=-1,
        max_task_retries=-1, get_if_exists=True, num_cpus=0,
    ).remote(f"sqlite:///{tmp_path}/ledger.db", PRICES)
    recorder = MetricsRecorder(
        actor_sink(actor, name=name, namespace="troupe", timeout_s=0.1),
        flush_interval_s=0.05, max_batch=40, initial_backoff_s=0.05, max_backoff_s=0.5,
    )
    try:
        await actor.start.remote()
        first = (await actor.health.remote())["started_at"]
        for i in range(N_EVENTS // 2):
            recorder.record(ev(i))
        await until(lambda: recorder.stats()["sent"] >= 100, 30, "first flushes")

        ray.kill(actor, no_restart=False)  # mid-stream: batches are in flight or buffered
        for i in range(N_EVENTS // 2, N_EVENTS):
            recorder.record(ev(i))
        await until(lambda: recorder.stats()["sent"] == N_EVENTS
                    and recorder.stats()["buffered"] == 0, 90, "every event delivered")

        health = await actor.health.remote()
        assert health["started_at"] > first, "the actor was not restarted"
        assert health["ledger_entries"] == N_EVENTS
        text = await actor.prometheus.remote()
        assert counter_total(text, "troupe_requests_total") == N_EVENTS
        expected_prompt = sum(10 + i % 7 for i in range(N_EVENTS))
        assert counter_total(text, "troupe_tokens_total", kind="prompt") == expected_prompt
        assert counter_total(text, "troupe_e2e_seconds_count") == N_EVENTS
        assert counter_total(text, "troupe_inter_token_seconds_count") == 2 * N_EVENTS
        expected_cost = sum((10 + i % 7) * 0.5 + (1 + i % 5) * 1.5 for i in range(N_EVENTS)) / 1e6
        assert counter_total(text, "troupe_cost_usd_total") == pytest.approx(expected_cost,
                                                                            abs=1e-9)
        usage = await actor.usage.remote(0, 10_000, "model")
        assert usage["totals"]["requests"] == N_EVENTS
        stats = recorder.stats()
        assert stats["dropped"] == 0
        # Calls made while the actor restarted timed out and were re-sent by the recorder
        # (Ray retried the originals too): the counts above are exact anyway.
        assert stats["failures"] >= 1, stats
    finally:
        await recorder.close(timeout_s=1.0)
        ray.kill(actor, no_restart=True)


async def test_sink_finds_a_recreated_actor_by_name(serve_instance, tmp_path):
    import ray

    name = f"troupe-metrics-test-{uuid.uuid4().hex[:8]}"
    url = f"sqlite:///{tmp_path}/ledger.db"

    def create():
        return ray.remote(MetricsActor).options(
            name=name, namespace="troupe", lifetime="detached", max_restarts=-1,
            max_task_retries=-1, get_if_exists=True, num_cpus=0,
        ).remote(url, PRICES)

    actor = create()
    recorder = MetricsRecorder(actor_sink(actor, name=name, namespace="troupe", timeout_s=5.0),
                               flush_interval_s=0.05, initial_backoff_s=0.05,
                               max_backoff_s=0.2)
    replacement = None
    try:
        for i in range(50):
            recorder.record(ev(i))
        await until(lambda: recorder.stats()["sent"] == 50, 30, "first batch")
        ray.kill(actor, no_restart=True)  # gone for good: the handle now raises ActorDiedError
        await until(lambda: _is_dead(ray, name), 30, "the old actor to be gone")
        replacement = create()  # e.g. the app redeployed: same name, same ledger
        for i in range(50, 120):
            recorder.record(ev(i))
        await until(lambda: recorder.stats()["sent"] == 120, 60, "delivery to the new actor")
        assert recorder.stats()["failures"] >= 1  # the dead handle failed, then was re-resolved
        text = await replacement.prometheus.remote()
        assert counter_total(text, "troupe_requests_total") == 120
    finally:
        await recorder.close(timeout_s=1.0)
        ray.kill(replacement or actor, no_restart=True)


def _is_dead(ray, name: str) -> bool:
    try:
        ray.get_actor(name, namespace="troupe")
    except ValueError:
        return True
    return False

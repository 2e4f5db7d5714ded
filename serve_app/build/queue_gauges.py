"""A text replica's engine queue, exported: depth, running requests and expected wait go to
the metrics actor as per-replica gauges (``troupe_engine_*`` on ``/metrics``, read by
``troupe status``).

The replica pushes a sample when it changes (checked every ``interval_s``) and at least
every ``heartbeat_s``, well inside the actor's gauge TTL, so a replica that dies drops out
of the exposition within a minute. A push that fails is logged and retried on the next tick:
metrics never hold up serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Optional

from actors.names import METRICS_ACTOR, NAMESPACE
from actors.recorder import GaugeSink, actor_gauge_sink

__all__ = ["QueueGauges", "start_queue_gauges"]

logger = logging.getLogger("troupe.queue_gauges")

#: queue_stats() key -> gauge name (actors/metrics/custom.py BUILTIN_GAUGES).
_GAUGES = {
    "queue_depth": "engine_queue_depth",
    "running": "engine_running_requests",
    "expected_wait_s": "engine_expected_wait_seconds",
}


class QueueGauges:
    """Pushes one replica's engine queue gauges to a gauge sink while the replica lives.

    Args:
        read: the engine's ``queue_stats()`` (None while no engine is loaded).
        sink: where samples go (the metrics actor's ``set_gauge``).
        labels: deployment, model and replica of this replica.
    """

    def __init__(self, read: Callable[[], Optional[dict[str, Any]]], sink: GaugeSink,
                 labels: dict[str, str], interval_s: float = 1.0,
                 heartbeat_s: float = 20.0) -> None:
        self.read, self.sink, self.labels = read, sink, labels
        self.interval_s, self.heartbeat_s = interval_s, heartbeat_s
        self._last: Optional[tuple[float, ...]] = None
        self._sent_at = 0.0

    async def tick(self) -> None:
        """Push the current values if they changed or the heartbeat is due."""
        stats = self.read() or {"queue_depth": 0, "running": 0, "expected_wait_s": 0.0}
        values = tuple(float(stats.get(key) or 0) for key in _GAUGES)
        if values == self._last and time.monotonic() - self._sent_at < self.heartbeat_s:
            return
        await self.sink([(name, self.labels, value)
                         for name, value in zip(_GAUGES.values(), values)])
        self._last, self._sent_at = values, time.monotonic()

    async def run(self) -> None:
        """Tick until cancelled (the replica's shutdown)."""
        while True:
            try:
                await self.tick()
            except Exception as exc:  # the metrics actor restarting: try again next tick
                logger.warning("engine queue gauges not pushed: %s", exc)
            await asyncio.sleep(self.interval_s)


def metrics_actor_sink(source: str) -> GaugeSink:
    """A gauge sink to the metrics actor, found by name on first use (the gateway creates
    it, maybe after this replica started)."""
    sinks: list[GaugeSink] = []

    async def sink(samples: list[Any]) -> None:
        if not sinks:
            import ray

            handle = await asyncio.to_thread(ray.get_actor, METRICS_ACTOR, namespace=NAMESPACE)
            sinks.append(actor_gauge_sink(handle, source, name=METRICS_ACTOR,
                                          namespace=NAMESPACE))
        await sinks[0](samples)

    return sink


def start_queue_gauges(replica: Any, deployment: str, model_id: str,
                       sink: Optional[GaugeSink] = None) -> asyncio.Task:
    """Start pushing a text replica's queue gauges on its event loop (metrics enabled), to
    ``sink`` (default: the named metrics actor, found on first use)."""

    def read() -> Optional[dict[str, Any]]:
        engine = replica.engine
        if engine is None or not hasattr(engine, "queue_stats"):
            return None
        return engine.queue_stats()

    labels = {"deployment": deployment, "model": model_id, "replica": replica.replica_id}
    gauges = QueueGauges(read, sink or metrics_actor_sink(replica.replica_id), labels)
    return asyncio.get_running_loop().create_task(gauges.run())

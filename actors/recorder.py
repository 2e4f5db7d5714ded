"""MetricsRecorder: the gateway side of metrics, microseconds per request.

One recorder per process (gateway replica). ``record(event)`` only appends to a buffer;
a background task sends the buffer to an async ``sink`` in batches: ``flush_interval_s``
after the first event arrives, or as soon as ``max_batch`` events are waiting. With nothing
buffered the task sleeps until an event comes (no timer ticks in an idle process). In production the
sink calls the metrics actor (:func:`actor_sink`); it is never awaited on the request path.

Delivery is at-least-once and ordered: a batch the sink fails on goes back to the front of
the buffer and is retried with exponential backoff (capped), and the actor skips event
ids it already has, so a batch whose acknowledgement was lost is not counted twice. The
buffer is bounded: beyond ``max_buffer`` the oldest events are dropped and counted
(``stats()["dropped"]``), so a long outage costs memory once, not forever.

Also carries gauges (in-flight requests per deployment): ``set_gauge`` stores the latest
value locally, and the flush task sends changed values (and all of them every
``gauge_refresh_s``, so the actor knows this process is alive) to ``gauge_sink``.

Call ``record`` and ``set_gauge`` from the event loop's thread. Imports no Ray at module
level (``actor_sink`` imports it when called).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections import deque
from typing import Any, Awaitable, Callable, Mapping, Optional, Sequence

from serve_app.protocol.metrics import RequestEvent

__all__ = [
    "MetricsRecorder",
    "EventSink",
    "GaugeSample",
    "GaugeSink",
    "actor_sink",
    "actor_gauge_sink",
    "default_source",
]

logger = logging.getLogger("troupe.metrics.recorder")

EventSink = Callable[[list[RequestEvent]], Awaitable[Any]]
"""``await sink(batch)`` delivers a batch (returns the number accepted) or raises."""

GaugeSample = tuple[str, dict[str, str], float]
GaugeSink = Callable[[list[GaugeSample]], Awaitable[Any]]


def default_source() -> str:
    """This process's identity for gauges: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class MetricsRecorder:
    """Buffers request events and flushes them to a sink in the background.

    Args:
        sink: async callable that delivers one batch, raising on failure.
        flush_interval_s: longest time an event waits in the buffer when all is well.
        max_batch: events per sink call; a full batch is flushed at once.
        max_buffer: events kept while the sink is failing; the oldest go first beyond it.
        initial_backoff_s / max_backoff_s: retry delays after a failure (doubling, with
            jitter, capped).
        gauge_sink: async callable receiving ``[(name, labels, value), ...]``.
        gauge_refresh_s: resend every gauge at least this often.
    """

    def __init__(
        self,
        sink: EventSink,
        *,
        flush_interval_s: float = 0.5,
        max_batch: int = 256,
        max_buffer: int = 100_000,
        initial_backoff_s: float = 0.1,
        max_backoff_s: float = 5.0,
        gauge_sink: Optional[GaugeSink] = None,
        gauge_refresh_s: float = 10.0,
    ) -> None:
        if max_batch < 1 or max_buffer < max_batch:
            raise ValueError("need 1 <= max_batch <= max_buffer")
        self._sink = sink
        self._interval = flush_interval_s
        self._max_batch = max_batch
        self._max_buffer = max_buffer
        self._initial_backoff = initial_backoff_s
        self._max_backoff = max_backoff_s
        self._gauge_sink = gauge_sink
        self._gauge_refresh = gauge_refresh_s
        self._buffer: deque[RequestEvent] = deque()
        self._in_flight = 0
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        self._task: Optional[asyncio.Task] = None
        self._closed = False
        self._backoff = 0.0  # > 0 while retrying after a failure
        self._gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._gauges_dirty = False
        self._gauges_sent_at = 0.0
        self._stats = {"recorded": 0, "sent": 0, "batches": 0, "accepted": 0, "dropped": 0,
                       "failures": 0, "gauge_failures": 0}
        self._last_error: Optional[str] = None

    # ------------------------------------------------------------------ hot path

    def record(self, event: RequestEvent) -> None:
        """Queue one event (O(1), never blocks, never raises on a sink problem)."""
        buffer = self._buffer
        if len(buffer) >= self._max_buffer:
            buffer.popleft()
            self._stats["dropped"] += 1
        buffer.append(event)
        self._stats["recorded"] += 1
        # Wake the flush task when the buffer stops being empty (it sleeps while there is
        # nothing to send) and when a batch is full (send it without waiting).
        if (len(buffer) == 1 or len(buffer) >= self._max_batch) and not self._backoff:
            self._wake.set()
        if self._task is None and not self._closed:
            self._start_soon()

    def set_gauge(self, name: str, labels: Mapping[str, str], value: float) -> None:
        """Remember a gauge's latest value; the flush task sends it."""
        key = (name, tuple(sorted(labels.items())))
        if self._gauges.get(key) != value:
            self._gauges[key] = value
            if not self._gauges_dirty:
                self._gauges_dirty = True
                self._wake.set()

    # ------------------------------------------------------------------ lifecycle

    def _start_soon(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (sync code, tests): flush() sends later
            return
        self._task = loop.create_task(self._run(), name="troupe-metrics-recorder")

    async def start(self) -> None:
        """Start the flush task now (``record`` also starts it on first use)."""
        if self._task is None and not self._closed:
            self._start_soon()

    async def close(self, timeout_s: float = 5.0) -> None:
        """Stop the flush task and try once more to send what is buffered."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        try:
            async with asyncio.timeout(timeout_s):
                await self.flush()
                await self._send_gauges(force=True)
        except Exception as exc:  # shutting down: report what is lost, do not raise
            logger.warning("metrics recorder closed with %d events unsent: %r",
                           len(self._buffer), exc)

    async def flush(self) -> int:
        """Send everything buffered now, in order; returns how many events were sent.

        Raises:
            Whatever the sink raised; the failed batch is back in the buffer.
        """
        return await self._drain()

    def stats(self) -> dict[str, Any]:
        """Counters: recorded, sent, batches, accepted, dropped, failures, buffered."""
        return {**self._stats, "buffered": len(self._buffer) + self._in_flight,
                "backoff_s": self._backoff, "last_error": self._last_error}

    # ------------------------------------------------------------------ flushing

    async def _run(self) -> None:
        # asyncio.timeout, not wait_for: on 3.11, wait_for swallows a cancel that races the
        # event being set, and close() would then wait for this task forever.
        while not self._closed:
            if not self._backoff:  # after a failure, retry as soon as the backoff ends
                if not self._buffer and not self._gauges_dirty:
                    # Idle: no timer ticks at all, except the gauges' keep-alive refresh.
                    await self._wait_wake(self._gauge_refresh if self._gauges else None)
                if len(self._buffer) < self._max_batch:
                    self._wake.clear()  # only a full batch cuts the gathering short
                    await self._wait_wake(self._interval)
            self._wake.clear()
            try:
                await self._drain()
            except Exception as exc:  # any sink failure: keep the events, back off, retry
                self._stats["failures"] += 1
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._backoff = min(self._max_backoff, (self._backoff * 2) or self._initial_backoff)
                delay = self._backoff * (0.5 + random.random() / 2)
                logger.warning("metrics flush failed (%s); %d events kept, retrying in %.2f s",
                               self._last_error, len(self._buffer), delay)
                await asyncio.sleep(delay)
                continue
            self._backoff = 0.0
            await self._send_gauges()

    async def _wait_wake(self, timeout_s: Optional[float]) -> None:
        """Until ``record``/``set_gauge`` wakes the task, or ``timeout_s`` (None: no limit)."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._wake.wait()
        except TimeoutError:
            pass
        self._wake.clear()

    async def _drain(self) -> int:
        sent = 0
        async with self._send_lock:
            buffer = self._buffer
            while buffer:
                batch = [buffer.popleft() for _ in range(min(len(buffer), self._max_batch))]
                self._in_flight = len(batch)
                try:
                    accepted = await self._sink(batch)
                except BaseException:
                    self._requeue(batch)
                    raise
                finally:
                    self._in_flight = 0
                sent += len(batch)
                self._stats["sent"] += len(batch)
                self._stats["batches"] += 1
                if isinstance(accepted, int):
                    self._stats["accepted"] += accepted
        return sent

    def _requeue(self, batch: list[RequestEvent]) -> None:
        """Put a failed batch back in front, in order; drop the oldest beyond the bound."""
        self._buffer.extendleft(reversed(batch))
        overflow = len(self._buffer) - self._max_buffer
        for _ in range(max(0, overflow)):
            self._buffer.popleft()
        if overflow > 0:
            self._stats["dropped"] += overflow

    async def _send_gauges(self, force: bool = False) -> None:
        if self._gauge_sink is None or not self._gauges:
            return
        now = time.monotonic()
        if not (force or self._gauges_dirty or now - self._gauges_sent_at >= self._gauge_refresh):
            return
        samples = [(name, dict(labels), value) for (name, labels), value in self._gauges.items()]
        self._gauges_dirty = False
        try:
            await self._gauge_sink(samples)
            self._gauges_sent_at = now
        except Exception as exc:  # gauges are re-sent next tick; never stop the event flush
            self._gauges_dirty = True
            self._stats["gauge_failures"] += 1
            logger.warning("metrics gauge update failed: %r", exc)


# --------------------------------------------------------------------------- Ray sinks


class _ActorRef:
    """A metrics actor handle that is looked up again by name after the actor died."""

    def __init__(self, handle: Any, name: str, namespace: str) -> None:
        self.handle = handle
        self.name = name
        self.namespace = namespace

    async def call(self, method: str, *args: Any, timeout_s: float) -> Any:
        from ray.exceptions import RayActorError

        try:
            ref = getattr(self.handle, method).remote(*args)
            async with asyncio.timeout(timeout_s):
                return await ref
        except RayActorError:
            await self._resolve()
            raise  # the recorder retries the batch with backoff

    async def _resolve(self) -> None:
        import ray

        try:
            self.handle = await asyncio.to_thread(ray.get_actor, self.name,
                                                  namespace=self.namespace)
        except ValueError:  # not registered (yet): keep the old handle, retry later
            logger.warning("metrics actor %s/%s not found; will retry", self.namespace,
                           self.name)


def actor_sink(
    actor_handle: Any,
    *,
    name: str = "troupe-metrics",
    namespace: str = "troupe",
    timeout_s: float = 30.0,
) -> EventSink:
    """An event sink calling ``MetricsActor.record`` on ``actor_handle``.

    A call that times out raises (the recorder retries; the actor skips ids it has). After
    ``ActorDiedError`` / ``RayActorError`` the actor is looked up again by name, so a
    recreated actor is found.
    """
    ref = _ActorRef(actor_handle, name, namespace)

    async def sink(events: list[RequestEvent]) -> int:
        return await ref.call("record", events, timeout_s=timeout_s)

    return sink


def actor_gauge_sink(
    actor_handle: Any,
    source: Optional[str] = None,
    *,
    name: str = "troupe-metrics",
    namespace: str = "troupe",
    timeout_s: float = 10.0,
) -> GaugeSink:
    """A gauge sink calling ``MetricsActor.set_gauge`` for each sample, as ``source``."""
    ref = _ActorRef(actor_handle, name, namespace)
    who = source or default_source()

    async def sink(samples: Sequence[GaugeSample]) -> None:
        await asyncio.gather(*(ref.call("set_gauge", n, labels, value, who, timeout_s=timeout_s)
                               for n, labels, value in samples))

    return sink

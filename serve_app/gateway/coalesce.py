"""Merge concurrent calls into batch calls, without a timer.

The gateway gets one HTTP request per embedding call; sending each to the model's
deployment costs a handle call on both sides (routing, serialization, the replica's own
request handling), which on a small CPU costs more than the forward pass it carries.
A :class:`Coalescer` sends concurrent items as one call instead:

* at most ``max_in_flight`` batch calls run at once;
* an item that arrives while a slot is free leaves at once, with whatever is queued
  (so a lone request waits for nothing);
* items that arrive while every slot is busy queue, and leave together, up to
  ``max_weight`` (e.g. inputs), as soon as a slot frees.

Under load the queue fills while calls run, so batches grow with the load; at low load
every item goes alone. The callee answers one result per item, in order; an item's
result may be an exception, which fails only that item. A failure of the whole call
fails every item in it.
"""

from __future__ import annotations

import asyncio
import collections
import copy
from typing import Awaitable, Callable, Deque, Generic, Sequence, TypeVar

__all__ = ["Coalescer"]

T = TypeVar("T")
R = TypeVar("R")


class Coalescer(Generic[T, R]):
    """Args:
        call: sends a list of items; returns one result (or exception) per item, in order.
        max_weight: most total weight per call; an item heavier than this goes alone.
        max_in_flight: most calls running at once.
        weight: an item's weight (default 1: ``max_weight`` counts items).
    """

    def __init__(
        self,
        call: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        max_weight: int,
        max_in_flight: int,
        weight: Callable[[T], int] = lambda _: 1,
    ) -> None:
        if max_weight < 1 or max_in_flight < 1:
            raise ValueError("max_weight and max_in_flight must be at least 1")
        self._call = call
        self.max_weight = max_weight
        self.max_in_flight = max_in_flight
        self._weight = weight
        self._queue: Deque[tuple[T, int, asyncio.Future[R]]] = collections.deque()
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Calls sent, items sent, largest call (items): shows the merging at work.
        self.calls = 0
        self.items = 0
        self.largest = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def submit(self, item: T) -> R:
        """Send ``item`` (alone or with others) and return its result.

        Cancelling the caller abandons its item: dropped if still queued, its result
        ignored if already sent.
        """
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, max(1, self._weight(item)), future))
        self._pump()
        return await future

    def _pump(self) -> None:
        while self._queue and self._in_flight < self.max_in_flight:
            batch: list[tuple[T, asyncio.Future[R]]] = []
            total = 0
            while self._queue:
                item, w, future = self._queue[0]
                if future.done():  # its caller gave up while it waited
                    self._queue.popleft()
                    continue
                if batch and total + w > self.max_weight:
                    break
                self._queue.popleft()
                batch.append((item, future))
                total += w
            if not batch:
                return
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.calls += 1
        self.items += len(batch)
        self.largest = max(self.largest, len(batch))
        try:
            results = await self._call([item for item, _ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch call answered {len(results)} results for {len(batch)} items")
        except BaseException as exc:  # noqa: BLE001 - every caller gets the call's failure
            for _, future in batch:
                if not future.done():
                    future.set_exception(_own_copy(exc))
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, BaseException):
                    future.set_exception(result)
                else:
                    future.set_result(result)
        finally:
            self._in_flight -= 1
            self._pump()


def _own_copy(exc: BaseException) -> BaseException:
    """A copy per caller: callers mark their error (e.g. as metered) independently."""
    if isinstance(exc, asyncio.CancelledError):
        return exc
    try:
        return copy.copy(exc)
    except Exception:  # noqa: BLE001 - an exception that cannot be copied is shared
        return exc

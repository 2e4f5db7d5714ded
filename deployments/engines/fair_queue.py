"""The waiting room of a batching engine: fair across API keys, interactive first, time-bounded.

* **Order.** Interactive traffic goes before batch-job traffic; within a class, API keys
  take turns (round-robin), so one key with 30 queued requests cannot make another key's
  single request wait behind all of them.
* **Bound.** Besides a count, the queue is bounded by the wait it implies: the expected
  wait of a newcomer is the work ahead of it (its depth over the batch's slots) times the
  recent service time of a request. Admission refuses a request whose expected wait
  exceeds ``max_queue_wait_s`` (429 ``OVERLOADED`` with that estimate as Retry-After), and
  a request admitted anyway never waits past the bound: the engine expires it with the
  same error.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Generic, Hashable, Iterator, Optional, TypeVar

__all__ = ["PRIORITIES", "FairQueue", "ServiceTime"]

#: Priority classes, most urgent first (``GenerationRequest.priority``).
PRIORITIES = ("interactive", "batch")

T = TypeVar("T")


class FairQueue(Generic[T]):
    """Round-robin across keys within each priority class; thread-safe."""

    def __init__(self) -> None:
        self._classes: list[OrderedDict[Hashable, deque[T]]] = [OrderedDict() for _ in PRIORITIES]
        self._lock = threading.Lock()
        self._size = 0

    @staticmethod
    def rank(priority: Optional[str]) -> int:
        """Index of a priority class (unknown or None: interactive)."""
        return PRIORITIES.index(priority) if priority in PRIORITIES else 0

    def __len__(self) -> int:
        return self._size

    def depth(self, up_to_rank: int = len(PRIORITIES) - 1) -> int:
        """Entries in classes at least as urgent as ``up_to_rank`` (what a newcomer waits behind)."""
        with self._lock:
            return sum(len(q) for c in self._classes[: up_to_rank + 1] for q in c.values())

    def push(self, item: T, key: Hashable, priority: Optional[str] = None) -> None:
        with self._lock:
            self._classes[self.rank(priority)].setdefault(key, deque()).append(item)
            self._size += 1

    def pop(self) -> Optional[T]:
        """The next entry: most urgent class first, then the key whose turn it is."""
        with self._lock:
            for keys in self._classes:
                if not keys:
                    continue
                key, items = next(iter(keys.items()))
                item = items.popleft()
                del keys[key]
                if items:  # still has work: to the back of the line
                    keys[key] = items
                self._size -= 1
                return item
        return None

    def peek(self) -> Optional[T]:
        """The entry ``pop`` would return, left in place."""
        with self._lock:
            for keys in self._classes:
                if keys:
                    return next(iter(keys.values()))[0]
        return None

    def remove(self, item: T) -> bool:
        """Take out one entry wherever it is (cancelled or expired); False if absent."""
        with self._lock:
            for keys in self._classes:
                for key, items in keys.items():
                    if item in items:
                        items.remove(item)
                        if not items:
                            del keys[key]
                        self._size -= 1
                        return True
        return False

    def __iter__(self) -> Iterator[T]:
        with self._lock:
            snapshot = [i for keys in self._classes for items in keys.values() for i in items]
        return iter(snapshot)


class ServiceTime:
    """Recent service time of a request (exponential moving average), and the waits it implies."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.seconds: Optional[float] = None

    def observe(self, seconds: float) -> None:
        if seconds < 0:
            return
        self.seconds = seconds if self.seconds is None else (
            self.alpha * seconds + (1 - self.alpha) * self.seconds
        )

    def expected_wait(self, ahead: int, running: int, slots: int) -> float:
        """Seconds until a newcomer with ``ahead`` entries before it gets a slot.

        With free slots and nobody ahead it starts at the next step. Otherwise every
        request ahead (and the running batch, which must free a slot first) takes one
        slot for one service time, ``slots`` at a time.
        """
        if self.seconds is None or (ahead == 0 and running < slots):
            return 0.0
        waves = math.ceil((ahead + 1) / max(1, slots))
        return waves * self.seconds


def now() -> float:
    """Monotonic clock used for queue waits (one place, so tests can reason about it)."""
    return time.monotonic()


def stats(queue: FairQueue[Any], service: ServiceTime, running: int, slots: int) -> dict[str, Any]:
    """Queue gauges for /health and metrics."""
    depth = len(queue)
    return {
        "queue_depth": depth,
        "running": running,
        "max_num_seqs": slots,
        "service_time_s": None if service.seconds is None else round(service.seconds, 3),
        "expected_wait_s": round(service.expected_wait(depth, running, slots), 3),
    }

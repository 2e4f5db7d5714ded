"""The LoRA adapters one text replica holds: loaded on first use, evicted least recently used.

Under Serve, :meth:`AdapterSlots.load` is the loader that ``serve.multiplexed`` wraps (the
app builder applies it): Serve keeps the LRU of leases, tells the router which replica
holds which adapter, and calls a lease's ``__del__`` when it evicts it. Without Serve
(unit tests, in-process handles) :class:`LocalMultiplexer` plays the same part.

An adapter evicted while requests still run on it is unloaded from the engine only when
the last of them ends, so eviction never pulls weights from under a running sequence.
No Ray, no torch.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Optional

from serve_app.errors import AdapterInvalid

__all__ = ["AdapterLease", "AdapterSlots", "LocalMultiplexer"]


class AdapterLease:
    """One loaded adapter, as the multiplexer caches it; evicting it unloads the adapter.

    Serve's multiplexer awaits ``lease.__del__()`` when it evicts the lease (then replaces
    the attribute). It is set on the instance, not the class, so garbage collection never
    calls it (a coroutine nobody awaits).
    """

    def __init__(self, slots: "AdapterSlots", adapter_id: str, load_ms: float) -> None:
        self.slots = slots
        self.adapter_id = adapter_id
        self.load_ms = load_ms
        #: The first request that sees this lease reports its load time (metering).
        self.reported = False
        self.__del__ = self.evict

    async def evict(self) -> None:
        """Drop the adapter from this replica (now, or once its running requests end)."""
        await self.slots.evict(self.adapter_id)


class AdapterSlots:
    """Adapter state of one replica: known paths, in-use counts, loads and evictions.

    Args:
        engine: returns the replica's current text engine (a reload replaces it); the
            engine has ``load_adapter(id, path)`` and ``unload_adapter(id)`` coroutines.
        paths: adapter id -> folder known from config (requests may name others).
        check: ``check(adapter_id, path)`` raises :class:`AdapterInvalid` for a folder the
            model cannot serve (run before every load).
    """

    def __init__(
        self,
        engine: Callable[[], Any],
        paths: Optional[dict[str, str]] = None,
        check: Optional[Callable[[str, str], Any]] = None,
    ) -> None:
        self.engine = engine
        self._check = check
        self.paths: dict[str, str] = dict(paths or {})
        self.loaded: set[str] = set()
        self.in_use: dict[str, int] = {}
        self._doomed: set[str] = set()  # evicted while in use: unload when the last ends
        self.loads = 0
        self.evictions = 0
        #: The multiplexed loader; the builder swaps in Serve's ``serve.multiplexed`` one.
        self.get: Callable[[str], Awaitable[AdapterLease]] = self.load

    async def load(self, adapter_id: str) -> AdapterLease:
        """Load ``adapter_id`` into the engine (the function Serve's multiplexing wraps)."""
        path = self.paths.get(adapter_id)
        if path is None:
            raise AdapterInvalid(
                f"This replica does not know where adapter {adapter_id!r} lives; register it "
                "with POST /models/{base}/adapters.",
                param="model", details={"adapter": adapter_id},
            )
        self._doomed.discard(adapter_id)
        if adapter_id in self.loaded:  # evicted but still in use, then wanted again
            return AdapterLease(self, adapter_id, 0.0)
        if self._check is not None:
            self._check(adapter_id, path)
        started = time.perf_counter()
        await self.engine().load_adapter(adapter_id, path)
        self.loaded.add(adapter_id)
        self.loads += 1
        return AdapterLease(self, adapter_id, (time.perf_counter() - started) * 1000.0)

    async def evict(self, adapter_id: str) -> None:
        """The multiplexer dropped the adapter: unload it now, or when its last request ends."""
        self.evictions += 1
        if self.in_use.get(adapter_id, 0) > 0:
            self._doomed.add(adapter_id)
            return
        await self._unload(adapter_id)

    async def _unload(self, adapter_id: str) -> None:
        if adapter_id in self.loaded:
            self.loaded.discard(adapter_id)
            await self.engine().unload_adapter(adapter_id)

    async def acquire(self, adapter_id: str, path: Optional[str]) -> tuple[AdapterLease, Optional[float]]:
        """Get the adapter loaded for one request; returns the lease and the load time this
        request waited for (None when it was already loaded)."""
        if path is not None:
            self.paths[adapter_id] = path
        lease = await self.get(adapter_id)
        self.in_use[adapter_id] = self.in_use.get(adapter_id, 0) + 1
        waited = None if lease.reported else lease.load_ms
        lease.reported = True
        return lease, waited

    async def release(self, adapter_id: str) -> None:
        """One request on the adapter ended."""
        left = self.in_use.get(adapter_id, 1) - 1
        if left > 0:
            self.in_use[adapter_id] = left
            return
        self.in_use.pop(adapter_id, None)
        if adapter_id in self._doomed:
            self._doomed.discard(adapter_id)
            await self._unload(adapter_id)

    def stats(self) -> dict[str, Any]:
        """For /health: what this replica holds."""
        return {
            "loaded": sorted(self.loaded),
            "loads": self.loads,
            "evictions": self.evictions,
        }


class LocalMultiplexer:
    """Serve's multiplexing LRU, for a replica outside Serve: at most ``capacity`` leases.

    Same contract as ``serve.multiplexed``: loads one at a time, moves a hit to the most
    recent end, and awaits the evicted lease's ``__del__``.
    """

    def __init__(self, loader: Callable[[str], Awaitable[AdapterLease]], capacity: int) -> None:
        self._loader = loader
        self.capacity = capacity
        self.leases: "OrderedDict[str, AdapterLease]" = OrderedDict()
        self._lock = asyncio.Lock()

    async def __call__(self, adapter_id: str) -> AdapterLease:
        if adapter_id in self.leases:
            self.leases.move_to_end(adapter_id)
            return self.leases[adapter_id]
        async with self._lock:
            if adapter_id in self.leases:
                return self.leases[adapter_id]
            if len(self.leases) >= self.capacity:
                _, oldest = self.leases.popitem(last=False)
                await oldest.evict()
            lease = self.leases[adapter_id] = await self._loader(adapter_id)
            return lease

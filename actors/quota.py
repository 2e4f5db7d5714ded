"""QuotaActor: the one place that counts rate-limit windows for every gateway replica.

Replicas do not ask per request: they lease blocks of requests (a few percent of a
limit) and admit locally until the block is used up, so the actor sees one call per
block. The actor never grants more than a window has left, so the cluster never admits
more than the limit; a block left unused when its window ends is simply lost (replicas
lease small blocks, and smaller ones as a window runs out, to keep that loss small).

Windows are fixed and aligned to the epoch (``floor(now / length) * length``), on the
actor's clock. Tokens are charged after the fact (replicas report usage) and admission
needs only a positive balance. Concurrency slots are leased and given back.
A plain class: the app builder makes it a named, detached Ray actor.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional

__all__ = ["QuotaActor", "QUOTA_ACTOR"]

QUOTA_ACTOR = "troupe-quota"


class QuotaActor:
    """Counts per (key, window kind)."""

    def __init__(self) -> None:
        # (key_id, kind) -> [window_start, used]
        self.windows: dict[tuple[str, str], list[float]] = {}
        self.in_flight: dict[str, int] = {}

    def _window(self, key_id: str, kind: str, length: float, now: float) -> list[float]:
        start = math.floor(now / length) * length
        slot = self.windows.get((key_id, kind))
        if slot is None or slot[0] != start:
            slot = self.windows[(key_id, kind)] = [start, 0]
        return slot

    def lease(
        self,
        key_id: str,
        requests: dict[str, tuple[int, float, int]],
        tokens: Optional[tuple[int, float, int]] = None,
        now: Optional[float] = None,
    ) -> dict[str, Any]:
        """Grant request blocks and charge token usage, in one call.

        Args:
            requests: kind -> (limit, window length s, how many wanted). A grant is all
                or nothing across kinds: the smallest grant is taken from every window.
            tokens: (limit, window length s, tokens used since the last report).

        Returns:
            ``{"granted": n, "windows": {kind: (remaining, reset_at)}, "tokens":
            (remaining, reset_at) or None, "now": actor time}``.
        """
        now = time.time() if now is None else now
        slots = {kind: self._window(key_id, kind, length, now)
                 for kind, (limit, length, _want) in requests.items()}
        granted = min(
            [max(0, min(want, int(limit - slots[kind][1])))
             for kind, (limit, _length, want) in requests.items()] or [0]
        )
        windows = {}
        for kind, (limit, length, _want) in requests.items():
            slots[kind][1] += granted
            windows[kind] = (int(limit - slots[kind][1]), slots[kind][0] + length)
        token_state = None
        if tokens is not None:
            limit, length, used = tokens
            slot = self._window(key_id, "tokens", length, now)
            slot[1] += used
            token_state = (int(limit - slot[1]), slot[0] + length)
        self._prune(now)
        return {"granted": granted, "windows": windows, "tokens": token_state, "now": now}

    def acquire(self, key_id: str, limit: int, want: int) -> int:
        """Lease up to ``want`` concurrency slots; returns how many (0: at the limit)."""
        held = self.in_flight.get(key_id, 0)
        grant = max(0, min(want, limit - held))
        self.in_flight[key_id] = held + grant
        return grant

    def release(self, key_id: str, n: int) -> None:
        """Give back ``n`` concurrency slots."""
        left = self.in_flight.get(key_id, 0) - n
        if left > 0:
            self.in_flight[key_id] = left
        else:
            self.in_flight.pop(key_id, None)

    def ready(self) -> bool:
        """Answers once the actor runs (replicas start it before their first lease)."""
        return True

    def snapshot(self) -> dict[str, Any]:
        """Counters, for tests and debugging."""
        return {"windows": {f"{k}:{kind}": v for (k, kind), v in self.windows.items()},
                "in_flight": dict(self.in_flight)}

    def _prune(self, now: float) -> None:
        if len(self.windows) < 10_000:
            return
        for key, (start, _used) in list(self.windows.items()):
            if start + 3600 < now:
                del self.windows[key]

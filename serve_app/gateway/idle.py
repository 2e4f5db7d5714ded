"""Polling that backs off while there is nothing to do.

A gateway that nobody uses should cost the machine almost nothing (issue 20: a running
``make run`` burned a quarter of a core with no traffic). Loops that must poll a store,
because other processes write to it, use :class:`IdleBackoff`: the base period while
they find work, doubling up to a ceiling while they find none, and the base again as soon
as they are woken or find work.
"""

from __future__ import annotations

__all__ = ["IdleBackoff", "IDLE_POLL_MAX_S"]

#: Longest wait between two polls of an idle loop.
IDLE_POLL_MAX_S = 15.0


class IdleBackoff:
    """The next wait of a polling loop.

    Args:
        base_s: the wait while polls find work (the configured poll interval).
        max_s: the longest wait while they find none.
        factor: growth per empty poll.
    """

    def __init__(self, base_s: float, max_s: float, factor: float = 2.0) -> None:
        if base_s <= 0 or max_s < base_s or factor < 1:
            raise ValueError("need 0 < base_s <= max_s and factor >= 1")
        self.base_s = base_s
        self.max_s = max_s
        self.factor = factor
        self._current = base_s

    def next(self, found: int) -> float:
        """The wait after a poll that found ``found`` things to do."""
        if found:
            self._current = self.base_s
            return self.base_s
        wait = self._current
        self._current = min(self.max_s, self._current * self.factor)
        return wait

    def reset(self) -> None:
        """Back to the base period (something woke the loop)."""
        self._current = self.base_s

"""The circuit breaker of the remote transport (one per provider, key and upstream), and
this process's registry of them."""

from __future__ import annotations

import time
from typing import Any, Optional

__all__ = ["CircuitBreaker", "shared_breaker"]


class CircuitBreaker:
    """Closed → open after ``threshold`` consecutive failures → half-open after
    ``reset_s`` (at most ``probes`` requests at once) → closed on a success."""

    def __init__(self, threshold: int, reset_s: float, probes: int) -> None:
        self.threshold = threshold
        self.reset_s = reset_s
        self.probes = probes
        self.state = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self._probing = 0
        self.opened_count = 0

    def acquire(self) -> Optional[bool]:
        """None: refused (open); True: this attempt is a half-open probe; False: normal."""
        if self.state == "open":
            if time.monotonic() - self.opened_at < self.reset_s:
                return None
            self.state = "half_open"
        if self.state == "half_open":
            if self._probing >= self.probes:
                return None
            self._probing += 1
            return True
        return False

    def retry_in(self) -> float:
        return max(0.0, self.reset_s - (time.monotonic() - self.opened_at))

    def release(self, probe: bool) -> None:
        """An attempt ended without a verdict on the upstream's health."""
        if probe:
            self._probing = max(0, self._probing - 1)

    def success(self, probe: bool) -> None:
        self.release(probe)
        self.state, self.failures = "closed", 0

    def failure(self, probe: bool) -> None:
        self.release(probe)
        self.failures += 1
        if self.state == "half_open" or self.failures >= self.threshold:
            if self.state != "open":
                self.opened_count += 1
            self.state, self.opened_at = "open", time.monotonic()




#: Circuit breakers of this process, by provider, key fingerprint and base URL.
_BREAKERS: dict[str, CircuitBreaker] = {}


def shared_breaker(key: str, settings: Any) -> CircuitBreaker:
    """This process's breaker for ``key``, made from ``settings`` (an engine's ``breaker``
    section) the first time: every engine calling the same upstream with the same key
    shares it, and the first one's settings win."""
    breaker = _BREAKERS.get(key)
    if breaker is None:
        breaker = _BREAKERS[key] = CircuitBreaker(
            settings.failure_threshold, settings.reset_timeout_s, settings.half_open_probes
        )
    return breaker

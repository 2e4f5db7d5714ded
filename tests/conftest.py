"""Shared test helpers (all layers)."""

from __future__ import annotations

import os
import time
from typing import Callable, TypeVar

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.02) -> T:
    """Poll ``predicate`` until it returns a truthy value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last: T = predicate()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value {last!r})")
        time.sleep(interval)
        last = predicate()
    return last

"""Pure helpers of the remote transport (:mod:`deployments.engines.remote`): which
statuses are retried, ``Retry-After`` hints, backoff with full jitter, and provider error
objects cut to size and scrubbed of the key before they are kept."""

from __future__ import annotations

import email.utils
import random
import time
from typing import Any, Optional

__all__ = [
    "MAX_ERROR_TEXT",
    "MAX_ERROR_BODY",
    "RETRYABLE_STATUS",
    "retry_after_seconds",
    "backoff_delay",
    "trim",
    "scrub",
]

#: Provider error texts kept in ``details`` are cut to this many characters.
MAX_ERROR_TEXT = 2000
#: Bytes of an error response body read at most.
MAX_ERROR_BODY = 64 * 1024
#: Statuses worth another attempt.
RETRYABLE_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


def retry_after_seconds(headers: Any) -> Optional[float]:
    """Seconds from ``Retry-After`` (delta-seconds or HTTP date) or ``retry-after-ms``."""
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            pass
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            return max(0.0, when.timestamp() - time.time())
    return None


def backoff_delay(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, base * 2**attempt)]."""
    return rng.uniform(0.0, min(max_s, base_s * (2 ** attempt)))


def trim(error: Any) -> Any:
    """A provider error object small enough to keep in ``details``."""
    if isinstance(error, dict):
        return {k: (v[:MAX_ERROR_TEXT] if isinstance(v, str) else v) for k, v in error.items()}
    return str(error)[:MAX_ERROR_TEXT]


def scrub(value: Any, secret: str) -> Any:
    """``value`` with every occurrence of ``secret`` replaced (strings, dicts, lists)."""
    if not secret:
        return value
    if isinstance(value, str):
        return value.replace(secret, "[redacted]")
    if isinstance(value, dict):
        return {k: scrub(v, secret) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, secret) for v in value]
    return value

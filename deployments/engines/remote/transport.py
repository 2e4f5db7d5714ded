"""The HTTP side of one attempt: send the request, wait for each phase under its deadline,
read the body, and let ``abort`` cut any of it short.

Timeouts by phase, named in ``details["phase"]``: ``connect``, ``first_byte`` (per
attempt, from its start), ``idle`` (between body reads) and ``total`` (the whole request,
retries and backoff included). Closing the response (``abort``, or the generator reading
it being closed) makes the provider stop generating, and billing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

from deployments.engines.remote.errors import Failures
from deployments.engines.remote.upstream_util import MAX_ERROR_BODY

__all__ = ["Deadlines", "Inflight", "UpstreamCall", "send", "abortable_sleep", "read_body",
           "read_error_text"]

#: aiohttp >= 3.10 raises this on a connect timeout; 3.9 (our floor) its base class.
_CONNECT_TIMEOUT = getattr(aiohttp, "ConnectionTimeoutError", aiohttp.ServerTimeoutError)


class Deadlines:
    """The per-phase waits of one attempt, each capped by what is left of the total."""

    def __init__(self, config: Any, total_end: float) -> None:
        self._config = config
        self._started = time.monotonic()
        self._total_end = total_end

    def _capped(self, wait: float, phase: str) -> tuple[float, str]:
        left = self._total_end - time.monotonic()
        if left <= wait:
            return max(left, 0.0), "total"
        return wait, phase

    def first_byte(self) -> tuple[float, str]:
        end = self._started + self._config.first_byte_timeout_s
        return self._capped(max(end - time.monotonic(), 0.0), "first_byte")

    def idle(self) -> tuple[float, str]:
        return self._capped(self._config.idle_timeout_s, "idle")

    def limit(self, phase: str) -> float:
        return {
            "first_byte": self._config.first_byte_timeout_s,
            "idle": self._config.idle_timeout_s,
            "total": self._config.total_timeout_s,
            "connect": self._config.connect_timeout_s,
        }[phase]


@dataclass
class Inflight:
    """One open upstream request, so ``abort`` can reach it."""

    aborted: bool = False
    response: Optional[aiohttp.ClientResponse] = None
    connecting: Optional[asyncio.Future] = None
    sleeping: Optional[asyncio.Future] = None
    started: float = field(default_factory=time.monotonic)

    def abort(self) -> None:
        self.aborted = True
        for fut in (self.connecting, self.sleeping):
            if fut is not None:
                fut.cancel()
        if self.response is not None:
            self.response.close()


@dataclass
class UpstreamCall:
    """One HTTP request to the upstream."""

    url: str
    headers: dict[str, str]
    body: dict[str, Any]


def current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())


async def send(
    session: aiohttp.ClientSession, inflight: Inflight, call: UpstreamCall, clock: Deadlines,
    fail: Failures,
) -> Optional[aiohttp.ClientResponse]:
    """POST ``call``; the response (any status), or None when ``inflight`` was aborted."""
    inflight.connecting = asyncio.ensure_future(
        session.post(call.url, json=call.body, headers=call.headers)
    )
    try:
        wait, phase = clock.first_byte()
        response = await asyncio.wait_for(asyncio.shield(inflight.connecting), wait)
    except asyncio.CancelledError:
        if inflight.aborted and not current_task_cancelling():
            return None
        raise
    except _CONNECT_TIMEOUT:
        raise fail.timeout("connect", clock.limit("connect"), True) from None
    except asyncio.TimeoutError:
        raise fail.timeout(phase, clock.limit(phase), phase != "total") from None
    except aiohttp.ClientError as exc:
        raise fail.connection(exc, call.url) from None
    finally:
        if not inflight.connecting.done():
            inflight.connecting.cancel()
        inflight.connecting = None
    inflight.response = response
    if inflight.aborted:
        response.close()
        return None
    return response


async def abortable_sleep(inflight: Inflight, delay: float) -> bool:
    """Backoff that ``abort`` can cut short; False when aborted."""
    inflight.sleeping = asyncio.ensure_future(asyncio.sleep(delay))
    try:
        await inflight.sleeping
    except asyncio.CancelledError:
        if inflight.aborted and not current_task_cancelling():
            return False
        raise
    finally:
        inflight.sleeping = None
    return not inflight.aborted


async def read_body(response: aiohttp.ClientResponse, clock: Deadlines, fail: Failures) -> bytes:
    """The whole body, within the first-byte deadline (a timeout there is retryable)."""
    wait, phase = clock.first_byte()
    try:
        return await asyncio.wait_for(response.read(), wait)
    except asyncio.TimeoutError:
        raise fail.timeout(phase, clock.limit(phase), True) from None


async def read_error_text(response: aiohttp.ClientResponse, clock: Deadlines) -> str:
    """The start of an error answer's body ("" when it does not come in time)."""
    try:
        wait, _ = clock.idle()
        raw = await asyncio.wait_for(response.content.read(MAX_ERROR_BODY), wait)
        return raw.decode("utf-8", "replace")
    except (asyncio.TimeoutError, aiohttp.ClientError):
        return ""

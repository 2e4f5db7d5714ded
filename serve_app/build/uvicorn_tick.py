"""Uvicorn's housekeeping tick, slowed in the processes that serve Troupe's HTTP.

Behind HAProxy, the gateway replica serves HTTP through uvicorn (Serve's direct ingress),
and so does Serve's fallback proxy.
uvicorn's ``Server.main_loop`` wakes every 0.1 s whatever the traffic, to refresh the
``Date`` header once a second and to notice ``should_exit``: about 0.17% of one core on an
idle process here, and ten of the twelve wake-ups a second of the replica's event loop.
:func:`slow_uvicorn_tick` makes that loop wake once per ``period_s`` instead, which
refreshes the ``Date`` header on every wake (it keeps whole-second accuracy at 1 s) and
notices a stop request up to ``period_s`` later (Serve drains a stopping replica for
longer than that anyway).

The replacement relies on uvicorn's ``on_tick(counter)`` contract (the date refreshes
when ``counter % 10 == 0``); where uvicorn's ``Server`` no longer has that shape, nothing
is changed and the caller is told so.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_TICK_S", "TICK_ENV", "slow_uvicorn_tick", "tick_from_env",
           "worker_process_setup"]

#: Seconds between uvicorn's housekeeping wake-ups (``TICK_ENV`` overrides; 0.1 or less
#: leaves uvicorn as it is).
DEFAULT_TICK_S = 1.0
TICK_ENV = "TROUPE_UVICORN_TICK_S"

#: uvicorn's own tick and its counter's wrap (one day of 0.1 s ticks).
_UVICORN_TICK_S = 0.1
_COUNTER_WRAP = 864000


def slow_uvicorn_tick(period_s: float = DEFAULT_TICK_S) -> bool:
    """Make every ``uvicorn.Server`` in this process wake every ``period_s`` seconds.

    Returns True when the tick is (now) slowed, False when uvicorn's ``Server`` does not
    have the ``main_loop``/``on_tick`` pair this replaces (left as it is). Idempotent.
    """
    import uvicorn

    server_cls: Any = uvicorn.Server
    current = server_cls.main_loop
    if getattr(current, "troupe_tick_s", None) is not None:
        current.troupe_tick_s = period_s
        return True
    on_tick = getattr(server_cls, "on_tick", None)
    if not (inspect.iscoroutinefunction(current) and inspect.iscoroutinefunction(on_tick)):
        return False
    if list(inspect.signature(on_tick).parameters) != ["self", "counter"]:
        return False

    async def main_loop(self: Any) -> None:
        # uvicorn's loop, one wake per period. on_tick reads the counter only to refresh
        # the Date header when counter % 10 == 0, so it advances by 10: every wake does.
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % _COUNTER_WRAP
            await asyncio.sleep(main_loop.troupe_tick_s)  # type: ignore[attr-defined]
            should_exit = await self.on_tick(counter)

    main_loop.troupe_tick_s = period_s  # type: ignore[attr-defined]
    main_loop.troupe_original = current  # type: ignore[attr-defined]
    server_cls.main_loop = main_loop
    return True


def tick_from_env() -> bool:
    """Slow uvicorn's tick to ``TROUPE_UVICORN_TICK_S`` seconds (default
    :data:`DEFAULT_TICK_S`); True when it is slowed. A value of 0.1 or less, or one that is
    not a number, leaves uvicorn as it is."""
    raw = os.environ.get(TICK_ENV, "")
    try:
        period_s = float(raw) if raw else DEFAULT_TICK_S
    except ValueError:
        logger.warning("Troupe: %s=%r is not a number; uvicorn's tick stays 0.1 s", TICK_ENV, raw)
        return False
    if period_s <= _UVICORN_TICK_S:
        return False
    if not slow_uvicorn_tick(period_s):
        logger.warning("Troupe: uvicorn's Server has changed shape; its 0.1 s tick stays")
        return False
    return True


def worker_process_setup() -> None:
    """Ray's worker process setup hook for the workers of a ``troupe run`` Ray: Serve's
    own proxy (the fallback behind HAProxy) runs uvicorn too, in a process Troupe's code
    does not otherwise reach. Never raises: Ray ends a worker whose hook fails."""
    try:
        tick_from_env()
    except Exception:  # noqa: BLE001 - a slower tick is not worth a worker
        logger.warning("Troupe: could not slow uvicorn's tick in this worker", exc_info=True)

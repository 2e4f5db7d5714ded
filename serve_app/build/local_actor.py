"""An actor object kept in this process, behind the ``handle.method.remote(...)`` surface.

The metrics actor is a Ray actor so that every replica can send it events; when nothing
but one gateway replica talks to it (one gateway replica, every model hosted in it, one
node), it can live in the gateway's own process instead, one idle Ray process fewer
(about 1% of a core; issue 20). Callers keep their code: ``remote()`` returns an
awaitable on the owning event loop, and a call from another thread (a span exporter's)
is handed to that loop.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

__all__ = ["InProcessActor"]


class _Method:
    def __init__(self, fn: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._fn = fn
        self._loop = loop

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        """Run the method on the owning loop: an awaitable Future there, a
        ``concurrent.futures.Future`` from any other thread (fire and forget)."""

        async def run() -> Any:
            out = self._fn(*args, **kwargs)
            return await out if inspect.isawaitable(out) else out

        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is self._loop:
            return asyncio.ensure_future(run())
        return asyncio.run_coroutine_threadsafe(run(), self._loop)


class InProcessActor:
    """A handle over a plain actor object living on ``loop`` (default: the running loop).

    Args:
        target: the actor object (e.g. :class:`actors.metrics.MetricsActor`).
        loop: the event loop its methods run on.
    """

    def __init__(self, target: Any, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.target = target
        self._loop = loop or asyncio.get_running_loop()

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(getattr(self.target, name), self._loop)

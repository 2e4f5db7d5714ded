"""Run a model's deployment class inside the gateway replica, behind the handle surface
:class:`~serve_app.gateway.core.GatewayCore` uses (``.stream.remote``, ``.complete.remote``,
``.stats.remote``, ``.options(stream=True)``, ``.cancel()``).

Remote provider engines hold no accelerator state, so a separate Serve deployment only
adds a hop (serialization, a router, a replica queue) to every request and every stream
chunk; ``run_in: gateway`` puts them here instead. Each gateway replica then owns one
engine (one connection pool) per such model. A CPU model of another modality keeps its
``max_ongoing_requests`` here as a cap (its engine's work runs in threads: without one, a
burst to one model would take every worker thread of the gateway's loop).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncGenerator, Optional

__all__ = ["LocalHandle"]


class _Call:
    """An awaitable, cancellable call (like a DeploymentResponse)."""

    def __init__(self, coro: Any) -> None:
        self._task = asyncio.ensure_future(coro)

    def __await__(self):
        return self._task.__await__()

    def cancel(self) -> None:
        self._task.cancel()


class _Stream:
    """An async iterator with ``cancel()`` (like a DeploymentResponseGenerator)."""

    def __init__(self, agen: AsyncGenerator[Any, None]) -> None:
        self._agen = agen

    def __aiter__(self) -> "_Stream":
        return self

    async def __anext__(self) -> Any:
        return await self._agen.__anext__()

    def cancel(self) -> None:
        closing = self._agen.aclose()
        task = asyncio.ensure_future(closing)
        task.add_done_callback(lambda t: t.cancelled() or t.exception())


#: Methods that manage the model rather than serve a request: never held by the cap.
_CONTROL = frozenset({"stats", "load", "unload", "shutdown", "start", "check_health"})


class _Method:
    def __init__(self, fn: Any, stream: bool, limit: Optional[asyncio.Semaphore]) -> None:
        self._fn = fn
        self._stream = stream
        self._limit = limit

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        if self._limit is not None:
            if self._stream:
                return _Stream(self._limited_stream(*args, **kwargs))
            return _Call(self._limited_call(*args, **kwargs))
        result = self._fn(*args, **kwargs)
        if self._stream:
            return _Stream(result)
        if asyncio.iscoroutine(result):
            return _Call(result)
        return _Call(_value(result))

    async def _limited_call(self, *args: Any, **kwargs: Any) -> Any:
        assert self._limit is not None
        async with self._limit:
            result = self._fn(*args, **kwargs)
            return await result if asyncio.iscoroutine(result) else result

    async def _limited_stream(self, *args: Any, **kwargs: Any) -> AsyncGenerator[Any, None]:
        assert self._limit is not None
        async with self._limit:
            async for item in self._fn(*args, **kwargs):
                yield item


async def _value(value: Any) -> Any:
    return value


class LocalHandle:
    """A handle over an in-process deployment object (an :class:`LLMDeployment` or another
    modality's :class:`~deployments.lifecycle.EngineHost`).

    Args:
        target: the deployment object.
        stream: calls return async iterators (``options(stream=True)``).
        limit: at most this many requests in the engine at once, the rest wait in turn
            (a Serve replica's ``max_ongoing_requests``); None: no cap of its own.
    """

    def __init__(self, target: Any, stream: bool = False,
                 limit: Optional[asyncio.Semaphore] = None) -> None:
        self._target = target
        self._stream = stream
        self._limit = limit

    def options(self, stream: bool = False, **_: Any) -> "LocalHandle":
        return LocalHandle(self._target, stream=stream, limit=self._limit)

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        limit = None if name in _CONTROL else self._limit
        return _Method(getattr(self._target, name), self._stream, limit)

"""Run a model's deployment class inside the gateway replica, behind the handle surface
:class:`~serve_app.gateway.core.GatewayCore` uses (``.stream.remote``, ``.complete.remote``,
``.stats.remote``, ``.options(stream=True)``, ``.cancel()``).

Remote provider engines hold no accelerator state, so a separate Serve deployment only
adds a hop (serialization, a router, a replica queue) to every request and every stream
chunk; ``run_in: gateway`` puts them here instead. Each gateway replica then owns one
engine (one connection pool) per such model.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncGenerator

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


class _Method:
    def __init__(self, fn: Any, stream: bool) -> None:
        self._fn = fn
        self._stream = stream

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        result = self._fn(*args, **kwargs)
        if self._stream:
            return _Stream(result)
        if asyncio.iscoroutine(result):
            return _Call(result)
        return _Call(_value(result))


async def _value(value: Any) -> Any:
    return value


class LocalHandle:
    """A handle over an in-process deployment object (an :class:`LLMDeployment`)."""

    def __init__(self, target: Any, stream: bool = False) -> None:
        self._target = target
        self._stream = stream

    def options(self, stream: bool = False, **_: Any) -> "LocalHandle":
        return LocalHandle(self._target, stream=stream)

    def __getattr__(self, name: str) -> _Method:
        if name.startswith("_"):
            raise AttributeError(name)
        return _Method(getattr(self._target, name), self._stream)

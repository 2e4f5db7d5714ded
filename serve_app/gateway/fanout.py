"""``n`` > 1: one engine request per choice, run side by side, each metered on its own.

Engines always produce one sequence; the gateway fans a request with ``n`` choices out into
``n`` requests with distinct request ids (and ``seed + i`` when a seed was given, so the
choices differ yet repeat), then joins their results or interleaves their streams tagged
with the choice index.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any, AsyncGenerator, Optional

from serve_app.protocol.internal import GenerationRequest, TextChunk

__all__ = ["fan_out", "complete_all", "stream_all"]

_SEED_SPACE = 2**64


def fan_out(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``n`` copies of ``request`` with ids ``<id>-<i>`` (one unchanged copy when n is 1)."""
    if n == 1:
        return [request]
    out = []
    seed = request.sampling.seed
    for i in range(n):
        sampling = dataclasses.replace(
            request.sampling, seed=None if seed is None else (seed + i) % _SEED_SPACE
        )
        out.append(dataclasses.replace(request, request_id=f"{request.request_id}-{i}",
                                       sampling=sampling))
    return out


async def complete_all(
    core: Any, model_id: str, requests: list[GenerationRequest], info: Any
) -> list[TextChunk]:
    """Every request to completion, in order; one failure cancels the rest."""
    if len(requests) == 1:
        return [await core.complete(model_id, requests[0], info)]
    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(core.complete(model_id, r, info)) for r in requests]
    return [t.result() for t in tasks]


async def stream_all(
    core: Any, model_id: str, requests: list[GenerationRequest], info: Any
) -> AsyncGenerator[tuple[int, TextChunk], None]:
    """``(choice index, chunk)`` pairs of every request's stream, as they come.

    The first failure ends the whole stream (raised here); closing it cancels every
    request still running.
    """
    if len(requests) == 1:
        async with contextlib.aclosing(core.stream(model_id, requests[0], info)) as chunks:
            async for chunk in chunks:
                yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Optional[TextChunk], Optional[BaseException]]] = (
        asyncio.Queue()
    )

    async def pump(index: int, request: GenerationRequest) -> None:
        try:
            async with contextlib.aclosing(core.stream(model_id, request, info)) as chunks:
                async for chunk in chunks:
                    await queue.put((index, chunk, None))
        except Exception as exc:  # handed to the reader, which raises it
            await queue.put((index, None, exc))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    try:
        open_choices = len(requests)
        while open_choices:
            index, chunk, error = await queue.get()
            if error is not None:
                raise error
            assert chunk is not None
            if chunk.finish_reason is not None:
                open_choices -= 1
            yield index, chunk
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

"""Small pieces the Responses and Anthropic Messages routes share.

Both APIs frame streams as named SSE events (``event:`` + ``data:``); these helpers turn
each into what ``SSEResponse`` takes.
"""

from __future__ import annotations

from typing import AsyncIterator

from sse_starlette import ServerSentEvent

from serve_app.errors import InferenceFailed
from serve_app.protocol.internal import TextChunk

__all__ = ["named", "next_chunk"]


def named(event: tuple[str, str]) -> ServerSentEvent:
    """One ``(event name, JSON text)`` pair as a named SSE event."""
    name, data = event
    return ServerSentEvent(data=data, event=name, sep="\n")


async def next_chunk(chunks: AsyncIterator[TextChunk]) -> TextChunk:
    """The next chunk of a stream that must end with a final chunk (a finish reason)."""
    try:
        return await chunks.__anext__()
    except StopAsyncIteration:
        raise InferenceFailed(
            "The model's stream ended without a finish reason. This is a server bug; "
            "retry the request."
        ) from None

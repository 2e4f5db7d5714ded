"""Small pieces the Responses and Anthropic Messages routes share.

Both APIs frame streams as named SSE events (``event:`` + ``data:``) and hand the gateway
their turns as ``(role, text)`` pairs; these helpers turn each into what the gateway and
``SSEResponse`` take.
"""

from __future__ import annotations

from typing import AsyncIterator, Iterable

from sse_starlette import ServerSentEvent

from serve_app.errors import InferenceFailed
from serve_app.protocol.internal import TextChunk

__all__ = ["Turn", "turns_of", "named", "next_chunk"]


class Turn:
    """A ``(role, text)`` turn with the ``role``/``text()`` surface ``build_request`` reads."""

    __slots__ = ("role", "_text")

    def __init__(self, role: str, text: str) -> None:
        self.role = role
        self._text = text

    def text(self) -> str:
        return self._text


def turns_of(pairs: Iterable[tuple[str, str]]) -> list[Turn]:
    return [Turn(role, text) for role, text in pairs]


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

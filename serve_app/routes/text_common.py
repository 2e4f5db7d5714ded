"""Small pieces the text routes share.

The Responses and Anthropic Messages APIs frame streams as named SSE events (``event:`` +
``data:``); :func:`named` and :func:`next_chunk` turn each into what ``SSEResponse`` takes.
:func:`apply_tools` is the one step of every text translator (native, chat, Responses,
Messages) that puts tools, tool choice and parallel calls onto the internal request.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable

from sse_starlette import ServerSentEvent

from serve_app.errors import InferenceFailed, InvalidRequest
from serve_app.protocol.internal import GenerationRequest, TextChunk, ToolChoice, ToolSpec
from serve_app.protocol.openai_tools import check_tool_choice

__all__ = ["named", "next_chunk", "apply_tools"]


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


def apply_tools(
    request: GenerationRequest,
    specs: Callable[[], tuple[ToolSpec, ...]],
    choice: ToolChoice,
    parallel: bool,
    required_name: str = "required",
) -> None:
    """Put a request's tools, tool choice and ``parallel_tool_calls`` onto ``request``: the
    one step every text route's translator shares.

    ``specs`` builds the tools (a ValueError from it is the ``tools`` field's fault);
    ``required_name`` is what the route's API calls "required" (Anthropic's ``any``).

    Raises:
        InvalidRequest: ``param="tools"`` (e.g. a repeated name) or ``param="tool_choice"``
            (a named tool that is not among the tools, ``required`` without tools).
    """
    try:
        request.tools = specs()
    except ValueError as exc:
        raise InvalidRequest(f"Invalid tools: {exc}", param="tools") from None
    request.tool_choice = choice
    why = check_tool_choice(choice, request.tools)
    if why is not None:
        raise InvalidRequest(why.replace("'required'", repr(required_name)), param="tool_choice")
    request.parallel_tool_calls = parallel

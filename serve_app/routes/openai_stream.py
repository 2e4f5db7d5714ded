"""Stream encoders of the OpenAI text routes: chat.completion.chunk and text_completion events.

Both read ``(choice index, chunk)`` pairs (``n`` > 1 and several prompts interleave) and
end with an optional usage chunk (summed over choices) and ``[DONE]``. Chunks are encoded
with orjson from small dicts and share one prefix string per stream.
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, Callable, Optional

import orjson

from serve_app.errors import TroupeError, as_troupe_error
from serve_app.http.plumbing import error_event_data
from serve_app.protocol.internal import TextChunk
from serve_app.protocol.openai_tools import (
    chat_logprobs_out,
    completion_logprobs_out,
    tool_call_deltas_out,
)

__all__ = ["Choices", "chat_events", "completion_events"]

#: ``(choice index, chunk)`` pairs, the first already awaited (see ``peek_stream``).
Choices = AsyncGenerator[tuple[int, TextChunk], None]


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


class _Usage:
    """Usage summed over the final chunks of every choice (prompt tokens once per prompt)."""

    def __init__(self, choices_per_prompt: int) -> None:
        self.per_prompt = choices_per_prompt
        self.prompt = 0
        self.completion = 0
        self.cached = 0

    def add(self, index: int, chunk: TextChunk) -> None:
        if index % self.per_prompt == 0:
            self.prompt += chunk.prompt_tokens
            self.cached += chunk.cached_tokens
        self.completion += chunk.completion_tokens

    def dict(self) -> dict[str, Any]:
        usage: dict[str, Any] = {"prompt_tokens": self.prompt, "completion_tokens": self.completion,
                                 "total_tokens": self.prompt + self.completion}
        if self.cached:  # as OpenAI reports a prompt-cache hit
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached}
        return usage


async def _drive(
    first: tuple[int, TextChunk],
    rest: Choices,
    total: int,
    emit: Callable[[int, TextChunk], list[str]],
    usage_line: Callable[[], Optional[str]],
    request_id: str,
) -> AsyncGenerator[str, None]:
    """Encode every pair with ``emit`` until ``total`` choices finished; then usage, [DONE]."""
    item = first
    finished = 0
    try:
        while True:
            for line in emit(*item):
                yield line
            if item[1].finish_reason is not None:
                finished += 1
                if finished == total:
                    usage = usage_line()
                    if usage is not None:
                        yield usage
                    break
            item = await rest.__anext__()
    except StopAsyncIteration:
        pass
    except TroupeError as exc:
        yield error_event_data(as_troupe_error(exc), request_id, openai=True)
    finally:
        await rest.aclose()
    yield "[DONE]"


async def chat_events(
    completion_id: str, created: int, model: str, include_usage: bool, top_logprobs: int,
    first: tuple[int, TextChunk], rest: Choices, n: int, request_id: str,
) -> AsyncGenerator[str, None]:
    """OpenAI chat.completion.chunk events for ``n`` choices.

    Each choice opens with a role delta; text rides in ``content``, tool calls in
    ``tool_calls`` (index, id, type and name in a call's first delta, argument fragments
    after); the last text rides with the finish reason.
    """
    head = '{"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,' % (
        completion_id, created, _dumps(model))
    tail = ',"usage":null}' if include_usage else "}"
    usage = _Usage(n)
    opened: set[int] = set()

    def choice(index: int, delta: str, finish: Optional[str], logprobs: str = "null") -> str:
        return '%s"choices":[{"index":%d,"delta":%s,"logprobs":%s,"finish_reason":%s}]%s' % (
            head, index, delta, logprobs, _dumps(finish), tail)

    def emit(index: int, chunk: TextChunk) -> list[str]:
        lines = []
        if index not in opened:
            opened.add(index)
            lines.append(choice(index, '{"role":"assistant","content":"","refusal":null}', None))
        finish = chunk.finish_reason
        delta: dict[str, Any] = {}
        if chunk.text:
            delta["content"] = chunk.text
        if chunk.tool_calls:
            delta["tool_calls"] = tool_call_deltas_out(chunk.tool_calls)
        logprobs = chat_logprobs_out(chunk.logprobs, top_logprobs)
        if delta or logprobs is not None or finish is not None:
            lines.append(choice(index, _dumps(delta), finish, _dumps(logprobs)))
        if finish is not None:
            usage.add(index, chunk)
        return lines

    def usage_line() -> Optional[str]:
        if not include_usage:
            return None
        return '%s"choices":[],"usage":%s}' % (head, _dumps(usage.dict()))

    async for line in _drive(first, rest, n, emit, usage_line, request_id):
        yield line


async def completion_events(
    completion_id: str, created: int, model: str, include_usage: bool,
    echoes: list[str], n: int, logprobs: Optional[int],
    first: tuple[int, TextChunk], rest: Choices, request_id: str,
) -> AsyncGenerator[str, None]:
    """OpenAI text_completion events: choice ``i`` is prompt ``i // n``'s choice ``i % n``;
    ``echoes[p]`` (the prompt when echo is on) opens that prompt's choices."""
    head = '{"id":"%s","object":"text_completion","created":%d,"model":%s,' % (
        completion_id, created, _dumps(model))
    tail = ',"usage":null}' if include_usage else "}"
    usage = _Usage(n)
    opened: set[int] = set()
    offsets: dict[int, int] = {}

    def choice(index: int, text: str, finish: Optional[str], lp: Any = None) -> str:
        return '%s"choices":[{"index":%d,"text":%s,"logprobs":%s,"finish_reason":%s}]%s' % (
            head, index, _dumps(text), _dumps(lp), _dumps(finish), tail)

    def emit(index: int, chunk: TextChunk) -> list[str]:
        lines = []
        if index not in opened:
            opened.add(index)
            echo = echoes[index // n]
            offsets[index] = len(echo)
            if echo:
                # With echo and logprobs the prompt's tokens come with the echoed text.
                echo_lp = None if logprobs is None or chunk.prompt_logprobs is None else \
                    completion_logprobs_out(None, logprobs, 0, chunk.prompt_logprobs)
                lines.append(choice(index, echo, None, echo_lp))
            elif chunk.prompt_logprobs is not None and logprobs is not None:
                # A token-id prompt: the engine's first chunk is the echoed prompt itself.
                lp = completion_logprobs_out(chunk.logprobs, logprobs, 0, chunk.prompt_logprobs)
                offsets[index] = len(chunk.text)
                lines.append(choice(index, chunk.text, chunk.finish_reason, lp))
                if chunk.finish_reason is not None:
                    usage.add(index, chunk)
                return lines
        lp = None
        if logprobs is not None:
            lp = completion_logprobs_out(chunk.logprobs, logprobs, offsets[index])
            offsets[index] += len(chunk.text)
        if chunk.text or chunk.finish_reason is not None or lp:
            lines.append(choice(index, chunk.text, chunk.finish_reason, lp))
        if chunk.finish_reason is not None:
            usage.add(index, chunk)
        return lines

    def usage_line() -> Optional[str]:
        if not include_usage:
            return None
        return '%s"choices":[],"usage":%s}' % (head, _dumps(usage.dict()))

    async for line in _drive(first, rest, n * len(echoes), emit, usage_line, request_id):
        yield line

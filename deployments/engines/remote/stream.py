"""Reading one attempt's 200 answer into :class:`EngineOutput` s: an SSE stream through
the provider's ``on_event``, or a whole JSON answer (a server that ignored ``stream``)
through its ``on_json``; then the final output with finish reason and exact usage.

An error a provider's parser raises mid-answer is scrubbed of the key and retried unless
it is the request's own fault (invalid request, payment, authorization).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, Optional, Protocol

import aiohttp

from deployments.engines.remote import transport
from deployments.engines.remote.errors import Failures, UpstreamFailure
from deployments.engines.remote.sse import SSEParser
from deployments.engines.remote.transport import Deadlines, Inflight
from deployments.engines.remote.upstream_util import scrub
from serve_app.errors import (
    AuthorizationFailed,
    InvalidRequest,
    PaymentRequired,
    TroupeError,
)
from serve_app.protocol.internal import EngineFinishReason, EngineOutput

__all__ = ["StreamState", "StreamHost", "read_answer", "mid_stream_failure"]


@dataclass
class StreamState:
    """What a provider's stream parser accumulates for one attempt."""

    got_bytes: bool = False
    #: The internal request's id (providers without call ids derive stable ones from it).
    request_id: str = ""
    done: bool = False
    finish_reason: Optional[EngineFinishReason] = None
    prompt_tokens: int = 0
    completion_tokens: Optional[int] = None
    #: num_tokens already yielded (one per content chunk).
    reported: int = 0
    #: Prompt tokens the provider served from its prompt cache (billed at the cached rate).
    cached_tokens: int = 0
    #: Output tokens spent thinking (included in ``completion_tokens``), where reported.
    reasoning_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class StreamHost(Protocol):
    """What reading an answer needs of the engine (a :class:`RemoteEngine`): its provider
    hooks, its final output and how it words transport failures."""

    @property
    def failures(self) -> Failures: ...

    def on_event(self, data: str, state: "StreamState") -> Optional[EngineOutput]: ...

    def on_json(self, body: Any, state: "StreamState") -> list[EngineOutput]: ...

    def _final(self, state: "StreamState") -> EngineOutput: ...


async def read_answer(
    engine: StreamHost, inflight: Inflight, response: aiohttp.ClientResponse,
    clock: Deadlines, secret: str, request_id: str = "",
) -> AsyncGenerator[EngineOutput, None]:
    """The outputs of one answer, the final one last (an ``abort`` output when aborted)."""
    state = StreamState(request_id=request_id)
    if response.headers.get("Content-Type", "").startswith("application/json"):
        async for out in _read_json(engine, response, clock, state, secret):
            yield out
        return
    parser = SSEParser()
    while True:
        chunk = await _next_chunk(engine, inflight, response, clock, state)
        if inflight.aborted:
            yield EngineOutput("", 0, state.prompt_tokens, "abort")
            return
        events = parser.feed(chunk) if chunk else parser.close()
        state.got_bytes = state.got_bytes or bool(chunk)
        for data in events:
            try:
                output = engine.on_event(data, state)
            except TroupeError as exc:
                raise mid_stream_failure(exc, secret) from None
            if output is not None:
                yield output
            if state.done:
                yield engine._final(state)
                return
        if not chunk:
            if state.finish_reason is not None:
                yield engine._final(state)  # ended without an end marker: accept it
                return
            raise engine.failures.cut_short(state.reported)


async def _next_chunk(
    engine: StreamHost, inflight: Inflight, response: aiohttp.ClientResponse,
    clock: Deadlines, state: StreamState,
) -> bytes:
    """The next bytes of the stream (b"" at its end), within the first-byte or idle wait."""
    wait, phase = clock.first_byte() if not state.got_bytes else clock.idle()
    try:
        return await asyncio.wait_for(response.content.readany(), wait)
    except asyncio.TimeoutError:
        raise engine.failures.timeout(phase, clock.limit(phase), phase == "first_byte") from None
    except aiohttp.ClientError as exc:
        if inflight.aborted:
            return b""
        raise engine.failures.connection(exc, "") from None


async def _read_json(
    engine: StreamHost, response: aiohttp.ClientResponse, clock: Deadlines,
    state: StreamState, secret: str,
) -> AsyncGenerator[EngineOutput, None]:
    try:
        body = json.loads(await transport.read_body(response, clock, engine.failures))
    except aiohttp.ClientError as exc:
        raise engine.failures.connection(exc, "") from None
    except ValueError:
        raise engine.failures.not_json() from None
    try:
        outputs = engine.on_json(body, state)
    except TroupeError as exc:
        raise mid_stream_failure(exc, secret) from None
    for out in outputs:
        yield out
    yield engine._final(state)


def mid_stream_failure(exc: TroupeError, secret: str) -> UpstreamFailure:
    """A provider parser's error as a failure: scrubbed; retried unless the request's fault."""
    exc.message = scrub(exc.message, secret)
    exc.details = scrub(exc.details, secret)
    terminal = isinstance(exc, (InvalidRequest, PaymentRequired, AuthorizationFailed))
    return UpstreamFailure(exc, retryable=not terminal, breaker=not terminal)

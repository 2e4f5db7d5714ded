"""A text engine over a remote OpenAI-compatible ``POST {base_url}/chat/completions``.

Every request streams upstream (``stream: true`` with ``stream_options.include_usage``) so
the gateway can stream too *and* the final output carries the provider's exact usage,
which is what cost is computed from:

* each SSE chunk with delta content becomes one :class:`EngineOutput` with
  ``num_tokens=1`` (an approximation: providers send about one token per chunk) and
  ``prompt_tokens=0`` (unknown until the usage chunk);
* the final output (``text=""``) carries ``finish_reason``, the exact
  ``usage.prompt_tokens``, and ``num_tokens = usage.completion_tokens - already reported``,
  so the sum of ``num_tokens`` over the stream equals the provider's completion tokens.
  When the provider reported fewer tokens than chunks it sent (never seen in practice),
  the correction is clamped at 0 and the sum overshoots by that difference. When the
  provider sends no usage at all (an OpenAI-compatible server ignoring
  ``include_usage``), the chunk approximation stands and ``prompt_tokens`` stays 0.

Finish reasons map ``stop``/``tool_calls``/``function_call``/``content_filter`` to
``stop`` and ``length`` to ``length``. (A filtered answer ends as a normal ``stop``: there
is no CONTENT_FILTERED error class yet to raise instead.)

Upstream HTTP errors map to Troupe errors by status (and, for 400, by the provider's
machine-readable ``error.code``, never by message text); see :func:`_upstream_error`.
Timeouts are named by phase in ``details["phase"]``: ``connect`` (TCP/TLS),
``first_byte`` (request start to the first body byte, connect included, since a slow
connect delays the first token just the same), ``idle`` (gap between body reads) and
``total`` (the whole request). There are no retries in this version.

The API key is read from ``os.environ[config.api_key_env]`` when each request starts,
so a rotated key is picked up by the next request while in-flight ones finish on the
old one. The key is never logged, and is scrubbed from any provider text kept in errors.

Closing the generator (or cancelling the task iterating it) closes the HTTP response,
which drops the upstream connection so the provider stops generating (and billing).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Optional

import aiohttp

from serve_app.config import OpenAIEngineConfig
from serve_app.errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    ContextLengthExceeded,
    InferenceFailed,
    InvalidRequest,
    RateLimitExceeded,
    Timeout,
    TroupeError,
)
from serve_app.protocol.internal import EngineOutput, GenerationRequest

__all__ = ["OpenAITextEngine", "SSEParser", "build_chat_body"]

logger = logging.getLogger(__name__)

_FINISH = {
    "stop": "stop",
    "length": "length",
    "tool_calls": "stop",
    "function_call": "stop",
    "content_filter": "stop",
}
#: Provider error bodies kept in ``details`` are cut to this many characters.
_MAX_ERROR_TEXT = 2000
#: aiohttp >= 3.10 raises this on a connect timeout; 3.9 (our floor) its base class.
_CONNECT_TIMEOUT = getattr(aiohttp, "ConnectionTimeoutError", aiohttp.ServerTimeoutError)
#: Bytes of an error response body read at most.
_MAX_ERROR_BODY = 64 * 1024


class SSEParser:
    """Incremental Server-Sent Events parser (the WHATWG rules Troupe needs).

    Feed it bytes as they arrive; it yields the ``data`` of each complete event (several
    ``data:`` lines joined by ``\\n``). Lines end in ``\\n``, ``\\r\\n`` or ``\\r``; a blank
    line ends an event; lines starting with ``:`` are comments; other fields (``event``,
    ``id``, ``retry``) are ignored because OpenAI's stream does not use them.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []
        self._decoder_tail = b""

    def feed(self, chunk: bytes) -> Iterator[str]:
        """Consume ``chunk``; yield the data of every event it completes."""
        raw = self._decoder_tail + chunk
        try:
            text = raw.decode("utf-8")
            self._decoder_tail = b""
        except UnicodeDecodeError as exc:
            # A multi-byte character split across reads: keep its start for the next feed.
            if exc.start < len(raw) - 3:
                raise
            text = raw[: exc.start].decode("utf-8")
            self._decoder_tail = raw[exc.start:]
        self._buffer += text
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return
            end, skip = cut
            line = self._buffer[:end]
            self._buffer = self._buffer[end + skip:]
            if line == "":
                if self._data:
                    yield "\n".join(self._data)
                    self._data = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)

    def close(self) -> Iterator[str]:
        """End of stream: an event not terminated by a blank line is dispatched anyway."""
        if self._buffer:
            yield from self.feed(b"\n\n")
        elif self._data:
            yield from self.feed(b"\n")


def _line_end(buffer: str) -> Optional[tuple[int, int]]:
    """Index and length of the first line terminator, or None when the line is partial."""
    for i, ch in enumerate(buffer):
        if ch == "\n":
            return i, 1
        if ch == "\r":
            if i + 1 == len(buffer):
                return None  # could be the start of "\r\n": wait for the next byte
            return i, 2 if buffer[i + 1] == "\n" else 1
    return None


def build_chat_body(model: str, request: GenerationRequest, context_length: int) -> dict[str, Any]:
    """The upstream JSON body for ``request`` (always streaming, with usage)."""
    if request.messages is not None:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
    else:
        messages = [{"role": "user", "content": request.prompt or ""}]
    sp = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": sp.temperature,
        "top_p": sp.top_p,
    }
    if sp.max_tokens is not None or sp.default_max_tokens is not None:
        # The provider counts the prompt itself; the whole context is the room we know of.
        body["max_tokens"] = sp.output_limit(context_length)
    if sp.seed is not None:
        body["seed"] = sp.seed
    if sp.stop:
        body["stop"] = list(sp.stop)
    return body


@dataclass
class _Inflight:
    """One open upstream request, so ``abort`` can reach it."""

    aborted: bool = False
    response: Optional[aiohttp.ClientResponse] = None
    connecting: Optional[asyncio.Task] = None
    started: float = field(default_factory=time.monotonic)

    def abort(self) -> None:
        self.aborted = True
        if self.connecting is not None:
            self.connecting.cancel()
        if self.response is not None:
            self.response.close()


class OpenAITextEngine:
    """See the module docstring."""

    def __init__(self, model_id: str, config: OpenAIEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.context_length = config.context_length
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._session: Optional[aiohttp.ClientSession] = None
        self._inflight: dict[str, _Inflight] = {}

    async def start(self) -> None:
        """Open the engine's one HTTP session (connection pool)."""
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.config.connect_timeout_s
            )
            self._session = aiohttp.ClientSession(timeout=timeout, raise_for_status=False)

    async def shutdown(self) -> None:
        """Abort every open request and close the session."""
        for inflight in list(self._inflight.values()):
            inflight.abort()
        if self._session is not None:
            await self._session.close()
            self._session = None

    def active_requests(self) -> int:
        return len(self._inflight)

    async def abort(self, request_id: str) -> None:
        inflight = self._inflight.get(request_id)
        if inflight is not None:
            inflight.abort()

    # ------------------------------------------------------------------ the stream

    def _headers(self) -> tuple[dict[str, str], str]:
        env = self.config.api_key_env
        key = os.environ.get(env, "").strip()
        if not key:
            raise AuthenticationFailed(
                f"No API key for the upstream provider of model '{self.model_id}': the "
                f"environment variable {env} is not set or empty. Set it on every node "
                f"that runs this model, e.g. `export {env}=sk-...`.",
                details={"provider": "openai", "api_key_env": env},
            )
        headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            "Accept": "text/event-stream",
        }
        if self.config.organization:
            headers["OpenAI-Organization"] = self.config.organization
        return headers, key

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineOutput]:
        if self._session is None:
            raise InferenceFailed(
                f"The engine for model '{self.model_id}' is not started (start() was not called)."
            )
        headers, key = self._headers()
        body = build_chat_body(self.config.model, request, self.context_length)
        inflight = _Inflight()
        self._inflight[request.request_id] = inflight
        clock = _Deadlines(self.config, inflight.started)
        try:
            response = await self._open(inflight, headers, body, clock, key)
            if response is None:
                yield EngineOutput("", 0, 0, "abort")
                return
            async with contextlib.aclosing(self._read_stream(inflight, response, clock)) as stream:
                async for output in stream:
                    yield output
        finally:
            self._inflight.pop(request.request_id, None)
            inflight.abort()  # closes the response: a no-op when it was read to the end

    async def _open(
        self,
        inflight: _Inflight,
        headers: dict[str, str],
        body: dict[str, Any],
        clock: "_Deadlines",
        key: str,
    ) -> Optional[aiohttp.ClientResponse]:
        """Send the request; return the 200 response, None when aborted, or raise."""
        assert self._session is not None
        inflight.connecting = asyncio.ensure_future(
            self._session.post(self._url, json=body, headers=headers)
        )
        try:
            wait, phase = clock.first_byte()
            response = await asyncio.wait_for(asyncio.shield(inflight.connecting), wait)
        except asyncio.CancelledError:
            if inflight.aborted and not _current_task_cancelling():
                return None
            raise
        except _CONNECT_TIMEOUT:
            raise self._timeout("connect", self.config.connect_timeout_s) from None
        except asyncio.TimeoutError:
            raise self._timeout(phase, clock.limit(phase)) from None
        except aiohttp.ClientError as exc:
            raise self._connection_failed(exc) from None
        finally:
            if not inflight.connecting.done():
                inflight.connecting.cancel()
            inflight.connecting = None
        inflight.response = response
        if inflight.aborted:
            response.close()
            return None
        if response.status != 200:
            try:
                raise await self._upstream_error(response, clock, key)
            finally:
                response.close()
        return response

    async def _read_stream(
        self, inflight: _Inflight, response: aiohttp.ClientResponse, clock: "_Deadlines"
    ) -> AsyncIterator[EngineOutput]:
        parser = SSEParser()
        state = _StreamState()
        while True:
            wait, phase = clock.first_byte() if not state.got_bytes else clock.idle()
            try:
                chunk = await asyncio.wait_for(response.content.readany(), wait)
            except asyncio.TimeoutError:
                raise self._timeout(phase, clock.limit(phase)) from None
            except aiohttp.ClientError as exc:
                if inflight.aborted:
                    chunk = b""
                else:
                    raise self._connection_failed(exc) from None
            if inflight.aborted:
                yield EngineOutput("", 0, state.prompt_tokens, "abort")
                return
            events = parser.feed(chunk) if chunk else parser.close()
            state.got_bytes = state.got_bytes or bool(chunk)
            for data in events:
                output = self._on_event(data, state)
                if output is not None:
                    yield output
                if state.done:
                    yield self._final(state)
                    return
            if not chunk:
                if state.finish_reason is not None:
                    yield self._final(state)  # ended without [DONE]: accept a finished answer
                    return
                raise InferenceFailed(
                    f"The upstream stream for model '{self.model_id}' ended before the "
                    "answer finished (no finish_reason, no [DONE]). Retrying may help.",
                    details={"provider": "openai", "tokens_received": state.reported},
                )

    def _on_event(self, data: str, state: "_StreamState") -> Optional[EngineOutput]:
        """Update ``state`` from one SSE event; return a content delta if it has one."""
        if data.strip() == "[DONE]":
            state.done = True
            return None
        try:
            event = json.loads(data)
        except ValueError:
            raise InferenceFailed(
                f"The upstream provider of model '{self.model_id}' sent a stream event that "
                "is not JSON.",
                details={"provider": "openai", "event": data[:200]},
            ) from None
        if not isinstance(event, dict):
            return None
        if event.get("error") is not None:
            error = event["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            raise InferenceFailed(
                f"The upstream provider of model '{self.model_id}' failed mid-stream: "
                f"{message}. Retrying may help.",
                details={"provider": "openai", "upstream_error": _trim(error)},
            )
        usage = event.get("usage")
        if isinstance(usage, dict):
            state.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            state.completion_tokens = int(usage.get("completion_tokens") or 0)
        text = ""
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            text += delta.get("content") or ""
            if choice.get("finish_reason"):
                state.finish_reason = _FINISH.get(choice["finish_reason"], "stop")
        if not text:
            return None
        state.reported += 1
        return EngineOutput(text, 1, state.prompt_tokens)

    def _final(self, state: "_StreamState") -> EngineOutput:
        if state.finish_reason is None:
            raise InferenceFailed(
                f"The upstream stream for model '{self.model_id}' ended with [DONE] but no "
                "finish_reason. Retrying may help.",
                details={"provider": "openai"},
            )
        correction = 0
        if state.completion_tokens is not None:
            correction = max(0, state.completion_tokens - state.reported)
        return EngineOutput("", correction, state.prompt_tokens, state.finish_reason)

    # ------------------------------------------------------------------ errors

    def _timeout(self, phase: str, limit_s: float) -> Timeout:
        return Timeout(
            f"The upstream provider of model '{self.model_id}' did not answer in time "
            f"(phase {phase}: no progress within {limit_s:g}s). Retrying may help; the "
            f"limits are the engine's *_timeout_s settings.",
            details={"phase": phase, "timeout_s": limit_s, "provider": "openai"},
        )

    def _connection_failed(self, exc: BaseException) -> InferenceFailed:
        return InferenceFailed(
            f"Could not reach the upstream provider of model '{self.model_id}' at "
            f"{self._url}: {type(exc).__name__}. Check base_url and the network; retrying "
            "may help.",
            details={"provider": "openai", "exception": type(exc).__name__},
        )

    async def _upstream_error(
        self, response: aiohttp.ClientResponse, clock: "_Deadlines", key: str
    ) -> TroupeError:
        """Map an upstream non-200 answer to a Troupe error (by status and error.code)."""
        status = response.status
        try:
            wait, _ = clock.idle()
            raw = await asyncio.wait_for(response.content.read(_MAX_ERROR_BODY), wait)
            text = raw.decode("utf-8", "replace")
        except (asyncio.TimeoutError, aiohttp.ClientError):
            text = ""
        text = text.replace(key, "[redacted]")
        error: Any
        try:
            error = json.loads(text).get("error")
        except (ValueError, AttributeError):
            error = None
        if not isinstance(error, dict):
            error = {"message": text[:_MAX_ERROR_TEXT]} if text else {}
        provider_message = str(error.get("message") or f"HTTP {status}")
        details = {"provider": "openai", "upstream_status": status, "upstream_error": _trim(error)}
        where = f"The upstream provider of model '{self.model_id}'"
        if status == 400 and error.get("code") == "context_length_exceeded":
            return ContextLengthExceeded(
                f"{where} says the prompt and max_tokens do not fit its context: "
                f"{provider_message}. Shorten the prompt or lower max_tokens.",
                param=error.get("param") or "messages",
                details=details,
            )
        if status == 401:
            return AuthenticationFailed(
                f"{where} rejected the API key from ${self.config.api_key_env}: "
                f"{provider_message}. Set a valid key in that variable.",
                details=details,
            )
        if status == 403:
            return AuthorizationFailed(
                f"{where} refused access: {provider_message}. Check the key's project, "
                "organization and model permissions.",
                details=details,
            )
        if status == 429:
            return RateLimitExceeded(
                f"{where} is rate limiting requests: {provider_message}. Retry after the "
                "Retry-After delay.",
                details=details,
                retry_after_s=_retry_after(response.headers),
            )
        if status >= 500:
            return InferenceFailed(
                f"{where} failed with HTTP {status}: {provider_message}. Retrying may help.",
                details=details,
            )
        return InvalidRequest(
            f"{where} rejected the request with HTTP {status}: {provider_message}.",
            param=error.get("param"),
            details=details,
        )


@dataclass
class _StreamState:
    got_bytes: bool = False
    done: bool = False
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: Optional[int] = None
    #: num_tokens already yielded (one per content chunk).
    reported: int = 0


class _Deadlines:
    """The per-phase waits of one request, each capped by what is left of the total."""

    def __init__(self, config: OpenAIEngineConfig, started: float) -> None:
        self._config = config
        self._started = started
        self._total_end = started + config.total_timeout_s

    def _capped(self, wait: float, phase: str) -> tuple[float, str]:
        left = self._total_end - time.monotonic()
        if left <= wait:
            return max(left, 0.0), "total"
        return wait, phase

    def first_byte(self) -> tuple[float, str]:
        end = self._started + self._config.first_byte_timeout_s
        return self._capped(max(end - time.monotonic(), 0.0), "first_byte")

    def idle(self) -> tuple[float, str]:
        return self._capped(self._config.idle_timeout_s, "idle")

    def limit(self, phase: str) -> float:
        return {
            "first_byte": self._config.first_byte_timeout_s,
            "idle": self._config.idle_timeout_s,
            "total": self._config.total_timeout_s,
            "connect": self._config.connect_timeout_s,
        }[phase]


def _retry_after(headers: Any) -> Optional[float]:
    """Seconds from ``Retry-After`` (delta-seconds or HTTP date) or ``retry-after-ms``."""
    value = headers.get("Retry-After")
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            return max(0.0, when.timestamp() - time.time())
    value = headers.get("retry-after-ms")
    if value:
        try:
            return max(0.0, float(value) / 1000.0)
        except ValueError:
            return None
    return None


def _trim(error: Any) -> Any:
    """A provider error object small enough to keep in ``details``."""
    if isinstance(error, dict):
        return {k: (v[:_MAX_ERROR_TEXT] if isinstance(v, str) else v) for k, v in error.items()}
    return str(error)[:_MAX_ERROR_TEXT]


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())

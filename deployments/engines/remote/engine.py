"""The base of every remote provider engine: its lifecycle, its two kinds of call
(a streamed generation, a unary JSON call) and the hooks a provider fills in.

A :class:`RemoteEngine` subclass supplies four things: the upstream request for an
internal :class:`GenerationRequest` (:meth:`RemoteEngine.build_http`), the handling of one
SSE event (:meth:`RemoteEngine.on_event`) and of a whole JSON answer
(:meth:`RemoteEngine.on_json`), and the classification of an error answer
(:meth:`RemoteEngine.classify_error`). The rest is shared: the phase deadlines and abort
(:mod:`.transport`), the one retry loop with credentials, breaker and backoff
(:mod:`.retry`), and the status table (:mod:`.errors`). Keys never appear in logs or
errors: provider text is scrubbed of the key before it is kept.

Closing the generator (or cancelling the task iterating it) closes the HTTP response, so
the provider stops generating (and billing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Optional

import aiohttp
import orjson

from deployments.engines.remote import transport
from deployments.engines.remote.breaker import CircuitBreaker
from deployments.engines.remote.errors import Failures, UpstreamFailure, classify_answer
from deployments.engines.remote.retry import RetryLoop
from deployments.engines.remote.stream import StreamState, read_answer
from deployments.engines.remote.transport import Deadlines, Inflight, UpstreamCall
from deployments.engines.remote.upstream_util import (
    MAX_ERROR_TEXT,
    retry_after_seconds,
    scrub,
    trim,
)
from serve_app.errors import (
    ContentFiltered,
    ContextLengthExceeded,
    InferenceFailed,
    PaymentRequired,
    TroupeError,
)
from serve_app.protocol.internal import EngineOutput, GenerationRequest

__all__ = ["RemoteEngine", "StreamState", "UpstreamCall", "UpstreamFailure"]

#: ``mid_stream_error``'s default: no kind to show beside the provider's message.
_NO_KIND = object()


class RemoteEngine:
    """Base of the remote provider engines (see the module docstring)."""

    #: Provider name used in errors, metrics and the breaker key.
    provider = "remote"

    def __init__(self, model_id: str, config: Any) -> None:
        self.model_id = model_id
        self.config = config
        self.context_length = config.context_length
        self._session: Optional[aiohttp.ClientSession] = None
        self._inflight: dict[str, Inflight] = {}
        self._creds: Any = None
        self._breakers: dict[str, CircuitBreaker] = {}
        self._rng = random.Random()
        self.counters: dict[str, int] = {
            "requests": 0, "retries": 0, "auth_refreshes": 0, "breaker_rejections": 0,
        }

    @property
    def failures(self) -> Failures:
        """The transport's own failures, worded for this engine."""
        return Failures(self.model_id, self.provider)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the engine's one HTTP session (connection pool) and its credential source."""
        from actors.session import credential_source

        if self._creds is None:
            self._creds = credential_source()
            self._creds.register(self.config.credential_name, self.config.api_key_env)
            await self._creds.start()
        if self._session is None:
            timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=self.config.connect_timeout_s
            )
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                timeout=timeout, raise_for_status=False, connector=connector
            )

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

    def stats(self) -> dict[str, Any]:
        """Counters for /health (no secrets: breakers are keyed by fingerprint)."""
        return {
            "provider": self.provider,
            **self.counters,
            "breakers": {k: b.state for k, b in self._breakers.items()},
        }

    # ------------------------------------------------------------------ provider hooks

    def build_http(self, request: GenerationRequest, secret: str) -> UpstreamCall:
        raise NotImplementedError

    def on_event(self, data: str, state: StreamState) -> Optional[EngineOutput]:
        """Update ``state`` from one SSE event; return a content delta if it has one."""
        raise NotImplementedError

    def on_json(self, body: Any, state: StreamState) -> list[EngineOutput]:
        """A whole (non-streaming) JSON answer: its content outputs; sets finish/usage."""
        raise NotImplementedError

    def classify_error(
        self, status: int, error: dict[str, Any], headers: Any
    ) -> Optional[TroupeError]:
        """A provider-specific error for this answer, or None for the status table."""
        return None

    def provider_error(self, body: Any) -> dict[str, Any]:
        """The provider's error object inside an error body (``{"error": {...}}`` default)."""
        error = body.get("error") if isinstance(body, dict) else None
        return error if isinstance(error, dict) else {}

    # ------------------------------------------------------------------ calls

    def _started(self) -> aiohttp.ClientSession:
        if self._session is None or self._creds is None:
            raise InferenceFailed(
                f"The engine for model '{self.model_id}' is not started (start() was not called)."
            )
        return self._session

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineOutput]:
        """Stream ``request``'s answer; a final output carries finish reason and usage."""
        session = self._started()
        inflight = Inflight()
        retry = RetryLoop(self, inflight.started + self.config.total_timeout_s)
        self.counters["requests"] += 1
        self._inflight[request.request_id] = inflight

        async def attempt(secret: str, clock: Deadlines) -> AsyncGenerator[EngineOutput, None]:
            call = self.build_http(request, secret)
            response = await self._open(session, inflight, call, clock, secret)
            if response is None:
                return  # aborted: nothing to say, and no verdict on the upstream
            answer = read_answer(self, inflight, response, clock, secret, request.request_id)
            async with contextlib.aclosing(answer) as out:
                async for output in out:
                    yield output

        yielded = False
        try:
            async with contextlib.aclosing(
                retry.run(attempt, lambda delay: transport.abortable_sleep(inflight, delay))
            ) as outputs:
                async for output in outputs:
                    yielded = True
                    yield output
            if not yielded:  # the loop ends without an output only when aborted
                yield EngineOutput("", 0, 0, "abort")
        finally:
            self._inflight.pop(request.request_id, None)
            inflight.abort()  # closes the response: a no-op when it was read to the end

    async def unary_json(
        self, url: str, headers_for: Callable[[str], dict[str, str]], body: dict[str, Any]
    ) -> Any:
        """One non-streaming JSON call (e.g. embeddings) with the engine's credentials,
        timeouts, retries, breaker and classification; returns the decoded JSON body."""
        if self._session is None or self._creds is None:
            raise InferenceFailed(f"The engine for model '{self.model_id}' is not started.")
        session = self._session
        retry = RetryLoop(self, time.monotonic() + self.config.total_timeout_s)

        async def attempt(secret: str, clock: Deadlines) -> AsyncGenerator[bytes, None]:
            call = UpstreamCall(url, headers_for(secret), body)
            response = await self._open(session, Inflight(), call, clock, secret)
            assert response is not None
            try:
                yield await transport.read_body(response, clock, self.failures)
            finally:
                response.close()

        async with contextlib.aclosing(retry.run(attempt, _sleep)) as answers:
            async for raw in answers:
                return json.loads(raw)
        raise AssertionError("unreachable: a unary call is never aborted")

    async def _open(
        self, session: aiohttp.ClientSession, inflight: Inflight, call: UpstreamCall,
        clock: Deadlines, secret: str,
    ) -> Optional[aiohttp.ClientResponse]:
        """Send the request; return the 200 response, None when aborted, or raise."""
        response = await transport.send(session, inflight, call, clock, self.failures)
        if response is not None and response.status != 200:
            try:
                raise await self._upstream_error(response, clock, secret)
            finally:
                response.close()
        return response

    def _final(self, state: StreamState) -> EngineOutput:
        if state.finish_reason is None:
            raise self.failures.no_finish_reason()
        correction = 0
        if state.completion_tokens is not None:
            correction = max(0, state.completion_tokens - state.reported)
        return EngineOutput("", correction, state.prompt_tokens, state.finish_reason,
                            cached_tokens=state.cached_tokens)

    async def _upstream_error(
        self, response: aiohttp.ClientResponse, clock: Deadlines, secret: str
    ) -> UpstreamFailure:
        """Map an upstream non-200 answer to a classified failure (see :mod:`.errors`)."""
        status = response.status
        text = scrub(await transport.read_error_text(response, clock), secret)
        try:
            error = self.provider_error(json.loads(text))
        except ValueError:
            error = {}
        if not error and text:
            error = {"message": text[:MAX_ERROR_TEXT]}
        error = trim(scrub(error, secret))
        specific = self.classify_error(status, error, response.headers)
        return classify_answer(status, error, retry_after_seconds(response.headers), specific,
                               self.model_id, self.provider, self.config)

    # ------------------------------------------------------------------ for providers

    def event_json(self, data: str) -> Optional[dict[str, Any]]:
        """One SSE event's JSON object (None for a JSON value that is not an object)."""
        try:
            event = orjson.loads(data)
        except ValueError:
            raise InferenceFailed(
                f"The upstream provider of model '{self.model_id}' sent a stream event that "
                "is not JSON.", details={"provider": self.provider, "event": data[:200]},
            ) from None
        return event if isinstance(event, dict) else None

    def mid_stream_error(self, error: Any, status: int = 400, kind: Any = _NO_KIND) -> TroupeError:
        """An error event inside an upstream stream: the specific error when
        :meth:`classify_error` knows it, else INFERENCE_FAILED naming the provider's
        message (and its ``kind``, e.g. the error type, when given)."""
        details = {"provider": self.provider, "upstream_error": error}
        if isinstance(error, dict):
            specific = self.classify_error(status, error, {})
            if specific is not None:
                specific.details = details
                return specific
            message = error.get("message")
        else:
            message = str(error)
        shown = f"{message} ({kind})" if kind is not _NO_KIND else f"{message}"
        return InferenceFailed(
            f"The upstream provider of model '{self.model_id}' failed mid-stream: "
            f"{shown}. Retrying may help.",
            details=details,
        )

    def context_error(self, message: str, param: str = "messages") -> ContextLengthExceeded:
        return ContextLengthExceeded(
            f"The upstream provider of model '{self.model_id}' says the prompt and max_tokens "
            f"do not fit its context: {message}. Shorten the prompt or lower max_tokens.",
            param=param,
        )

    def content_error(self, message: str) -> ContentFiltered:
        return ContentFiltered(
            f"The upstream provider of model '{self.model_id}' blocked the request or its "
            f"answer with its content filter: {message}. Rephrase the request.",
        )

    def quota_error(self, message: str) -> PaymentRequired:
        return PaymentRequired(
            f"The upstream provider of model '{self.model_id}' says the account is out of "
            f"quota: {message}. Check the provider account's plan and credits.",
        )


async def _sleep(delay: float) -> bool:
    """A unary call's backoff (nothing aborts it)."""
    await asyncio.sleep(delay)
    return True

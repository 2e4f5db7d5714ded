"""The transport every remote provider engine shares: credentials, timeouts, retries,
circuit breaker and error classification. Providers only translate wire formats.

A :class:`RemoteEngine` subclass supplies four things: the upstream request for an
internal :class:`GenerationRequest` (:meth:`RemoteEngine.build_http`), the handling of one
SSE event (:meth:`RemoteEngine.on_event`) and of a whole JSON answer
(:meth:`RemoteEngine.on_json`), and the classification of an error answer
(:meth:`RemoteEngine.classify_error`). Everything else lives here:

* **Credentials**: a request captures the process's current credential snapshot at
  start (:mod:`actors.session`) and keeps it for its whole life, retries included. The
  one exception is an upstream 401: the engine asks for a newer snapshot once and, when
  the key changed, retries on it (counted in ``auth_refreshes``); otherwise the request
  ends with AUTHENTICATION_FAILED. Keys never appear in logs or errors: provider text
  is scrubbed of the key before it is kept.
* **Timeouts by phase**, named in ``details["phase"]``: ``connect``, ``first_byte`` (per
  attempt, from its start), ``idle`` (between body reads) and ``total`` (the whole request,
  retries and backoff included).
* **Retries** with exponential backoff and full jitter on 408/409/429/5xx, connection
  errors and first-byte timeouts, honoring ``Retry-After`` (a hint longer than
  ``retry.max_retry_after_s`` ends the request at once with the hint), and only while
  nothing has been yielded yet, so a client never sees a duplicated or spliced answer.
* **Circuit breaker** per provider and key fingerprint: ``failure_threshold``
  consecutive failures (5xx, 408, timeouts, connection errors) open it; while open,
  requests fail at once with 503 OVERLOADED and ``Retry-After``; after
  ``reset_timeout_s`` up to ``half_open_probes`` requests probe it; a success closes it.
* **Classification** shared by providers: context length → CONTEXT_LENGTH_EXCEEDED (400,
  no retry), content filter → CONTENT_FILTERED (no retry), 401 → AUTHENTICATION_FAILED
  (after one refresh), 402 / insufficient quota → PAYMENT_REQUIRED, 429 →
  RATE_LIMIT_EXCEEDED with the upstream's retry hint, 5xx → INFERENCE_FAILED; the
  provider's error object is kept in ``details["upstream_error"]``.

Closing the generator (or cancelling the task iterating it) closes the HTTP response, so
the provider stops generating (and billing).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

import aiohttp
import orjson

from deployments.engines.breaker import CircuitBreaker
from deployments.engines.sse import SSEParser
from deployments.engines.upstream_util import (
    MAX_ERROR_BODY,
    MAX_ERROR_TEXT,
    RETRYABLE_STATUS,
    backoff_delay,
    retry_after_seconds,
    scrub,
    trim,
)
from serve_app.errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    ContentFiltered,
    ContextLengthExceeded,
    InferenceFailed,
    InvalidRequest,
    Overloaded,
    PaymentRequired,
    RateLimitExceeded,
    Timeout,
    TroupeError,
)
from serve_app.protocol.internal import EngineOutput, GenerationRequest

__all__ = [
    "RemoteEngine",
    "UpstreamFailure",
    "CircuitBreaker",
    "SSEParser",
    "StreamState",
    "retry_after_seconds",
    "backoff_delay",
]

logger = logging.getLogger(__name__)

#: aiohttp >= 3.10 raises this on a connect timeout; 3.9 (our floor) its base class.
_CONNECT_TIMEOUT = getattr(aiohttp, "ConnectionTimeoutError", aiohttp.ServerTimeoutError)


@dataclass
class UpstreamFailure(Exception):
    """A failed attempt, classified: what to raise, and whether another attempt may help."""

    error: TroupeError
    retryable: bool = False
    retry_after_s: Optional[float] = None
    auth: bool = False
    #: Counts against the circuit breaker (5xx, 408, timeouts, connection errors).
    breaker: bool = False

    def __post_init__(self) -> None:
        Exception.__init__(self, self.error.message)


# --------------------------------------------------------------------------- deadlines


class Deadlines:
    """The per-phase waits of one attempt, each capped by what is left of the total."""

    def __init__(self, config: Any, total_end: float) -> None:
        self._config = config
        self._started = time.monotonic()
        self._total_end = total_end

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


@dataclass
class _Inflight:
    """One open upstream request, so ``abort`` can reach it."""

    aborted: bool = False
    response: Optional[aiohttp.ClientResponse] = None
    connecting: Optional[asyncio.Future] = None
    sleeping: Optional[asyncio.Future] = None
    started: float = field(default_factory=time.monotonic)

    def abort(self) -> None:
        self.aborted = True
        for fut in (self.connecting, self.sleeping):
            if fut is not None:
                fut.cancel()
        if self.response is not None:
            self.response.close()


@dataclass
class StreamState:
    """What a provider's stream parser accumulates for one attempt."""

    got_bytes: bool = False
    done: bool = False
    finish_reason: Optional[str] = None
    prompt_tokens: int = 0
    completion_tokens: Optional[int] = None
    #: num_tokens already yielded (one per content chunk).
    reported: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class UpstreamCall:
    """One HTTP request to the upstream."""

    url: str
    headers: dict[str, str]
    body: dict[str, Any]


# --------------------------------------------------------------------------- the engine

#: Circuit breakers of this process, by provider, key fingerprint and base URL.
_BREAKERS: dict[str, CircuitBreaker] = {}


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
        self._inflight: dict[str, _Inflight] = {}
        self._creds: Any = None
        self._breakers: dict[str, CircuitBreaker] = {}
        self._rng = random.Random()
        self.counters: dict[str, int] = {
            "requests": 0, "retries": 0, "auth_refreshes": 0, "breaker_rejections": 0,
        }

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
        """A provider-specific error for this answer, or None for the shared mapping."""
        return None

    def provider_error(self, body: Any) -> dict[str, Any]:
        """The provider's error object inside an error body (``{"error": {...}}`` default)."""
        error = body.get("error") if isinstance(body, dict) else None
        return error if isinstance(error, dict) else {}

    # ------------------------------------------------------------------ generate

    def _credential(self, snapshot: Any) -> Any:
        name = self.config.credential_name
        cred = snapshot.get(name)
        if cred is None:
            env = snapshot.envs.get(name) or self.config.api_key_env
            raise AuthenticationFailed(
                f"No API key for the upstream provider of model '{self.model_id}' "
                f"(credential {name!r}): the environment variable {env} is not set or "
                "empty, and no key was set in the secrets file or with POST "
                f"/admin/credentials. Set one, e.g. `export {env}=...`.",
                details={"provider": self.provider, "credential": name, "api_key_env": env},
            )
        return cred

    def _breaker(self, cred: Any) -> CircuitBreaker:
        """The breaker of (provider, base URL, key), shared by every engine of this process
        that calls the same upstream with the same key (the first one's settings win)."""
        key = f"{self.provider}:{cred.fingerprint}"
        breaker = self._breakers.get(key)
        if breaker is None:
            b = self.config.breaker
            shared = f"{key}@{getattr(self.config, 'base_url', '')}"
            breaker = _BREAKERS.get(shared)
            if breaker is None:
                breaker = _BREAKERS[shared] = CircuitBreaker(
                    b.failure_threshold, b.reset_timeout_s, b.half_open_probes
                )
            self._breakers[key] = breaker
        return breaker

    def _acquire(self, cred: Any) -> tuple[CircuitBreaker, bool]:
        """The breaker for ``cred`` and whether this attempt is a half-open probe; raises
        OVERLOADED (503 + Retry-After) at once while it is open."""
        breaker = self._breaker(cred)
        probe = breaker.acquire()
        if probe is None:
            self.counters["breaker_rejections"] += 1
            raise Overloaded(
                f"The upstream provider of model '{self.model_id}' is failing: its circuit "
                "breaker is open after repeated errors. Retry after the Retry-After delay.",
                retry_after_s=max(1.0, breaker.retry_in()),
                status=503,
                details={"provider": self.provider, "breaker": "open",
                         "key_fingerprint": cred.fingerprint},
            )
        return breaker, probe

    async def _after_failure(
        self, plan: "_Plan", failure: UpstreamFailure, yielded: bool
    ) -> float:
        """Decide what follows a failed attempt: seconds to wait before the next one (0 for
        a retry on a refreshed key), or raise the failure's error."""
        if failure.auth and not plan.auth_refreshed and not yielded:
            fresh = await self._creds.refresh_after_auth_failure(plan.snapshot)
            new = fresh.get(self.config.credential_name)
            if new is not None and new.fingerprint != plan.cred.fingerprint:
                self.counters["auth_refreshes"] += 1
                _count_metric("remote_auth_refresh_total", self.provider)
                logger.info("model %s: upstream 401 with key %s; retrying once with %s",
                            self.model_id, plan.cred.fingerprint, new.fingerprint)
                plan.auth_refreshed, plan.snapshot, plan.cred = True, fresh, new
                return 0.0
        retry = self.config.retry
        hint = failure.retry_after_s
        if yielded or not failure.retryable or plan.attempt >= retry.max_retries or (
            hint is not None and hint > retry.max_retry_after_s
        ):
            raise failure.error from None
        delay = backoff_delay(plan.attempt, retry.backoff_base_s, retry.backoff_max_s, self._rng)
        delay = max(delay, hint or 0.0)
        if time.monotonic() + delay >= plan.total_end:
            raise failure.error from None
        plan.attempt += 1
        self.counters["retries"] += 1
        return delay

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineOutput]:
        if self._session is None or self._creds is None:
            raise InferenceFailed(
                f"The engine for model '{self.model_id}' is not started (start() was not called)."
            )
        snapshot = self._creds.current()  # captured once: the key of this request's life
        inflight = _Inflight()
        plan = _Plan(snapshot, self._credential(snapshot),
                     inflight.started + self.config.total_timeout_s)
        self.counters["requests"] += 1
        self._inflight[request.request_id] = inflight
        yielded = False
        try:
            while True:
                breaker, probe = self._acquire(plan.cred)
                verdict = False  # whether this attempt already told the breaker its outcome
                try:
                    secret = plan.cred.secret
                    clock = Deadlines(self.config, plan.total_end)
                    response = await self._open(
                        inflight, self.build_http(request, secret), clock, secret)
                    if response is None:
                        yield EngineOutput("", 0, 0, "abort")
                        return
                    async with contextlib.aclosing(
                        self._read(inflight, response, clock, secret)
                    ) as stream:
                        async for output in stream:
                            if not verdict:
                                # The first output is about to reach the client: the upstream
                                # is healthy, and no retry may happen from now on.
                                breaker.success(probe)
                                verdict = True
                            yielded = True
                            yield output
                    return
                except UpstreamFailure as failure:
                    if not verdict:
                        (breaker.failure if failure.breaker else breaker.release)(probe)
                        verdict = True
                    delay = await self._after_failure(plan, failure, yielded)
                    if delay and not await self._sleep(inflight, delay):
                        yield EngineOutput("", 0, 0, "abort")
                        return
                finally:
                    if not verdict:
                        breaker.release(probe)
        finally:
            self._inflight.pop(request.request_id, None)
            inflight.abort()  # closes the response: a no-op when it was read to the end

    async def _sleep(self, inflight: _Inflight, delay: float) -> bool:
        """Backoff that ``abort`` can cut short; False when aborted."""
        inflight.sleeping = asyncio.ensure_future(asyncio.sleep(delay))
        try:
            await inflight.sleeping
        except asyncio.CancelledError:
            if inflight.aborted and not _current_task_cancelling():
                return False
            raise
        finally:
            inflight.sleeping = None
        return not inflight.aborted

    async def _open(
        self, inflight: _Inflight, call: UpstreamCall, clock: Deadlines, secret: str
    ) -> Optional[aiohttp.ClientResponse]:
        """Send the request; return the 200 response, None when aborted, or raise."""
        assert self._session is not None
        inflight.connecting = asyncio.ensure_future(
            self._session.post(call.url, json=call.body, headers=call.headers)
        )
        try:
            wait, phase = clock.first_byte()
            response = await asyncio.wait_for(asyncio.shield(inflight.connecting), wait)
        except asyncio.CancelledError:
            if inflight.aborted and not _current_task_cancelling():
                return None
            raise
        except _CONNECT_TIMEOUT:
            raise self._timeout("connect", clock.limit("connect"), True) from None
        except asyncio.TimeoutError:
            raise self._timeout(phase, clock.limit(phase), phase != "total") from None
        except aiohttp.ClientError as exc:
            raise self._connection_failed(exc, call.url) from None
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
                raise await self._upstream_error(response, clock, secret)
            finally:
                response.close()
        return response

    async def _read(
        self, inflight: _Inflight, response: aiohttp.ClientResponse, clock: Deadlines,
        secret: str,
    ) -> AsyncIterator[EngineOutput]:
        state = StreamState()
        ctype = response.headers.get("Content-Type", "")
        if ctype.startswith("application/json"):
            async for out in self._read_json(inflight, response, clock, state, secret):
                yield out
            return
        parser = SSEParser()
        while True:
            wait, phase = clock.first_byte() if not state.got_bytes else clock.idle()
            try:
                chunk = await asyncio.wait_for(response.content.readany(), wait)
            except asyncio.TimeoutError:
                raise self._timeout(phase, clock.limit(phase), phase == "first_byte") from None
            except aiohttp.ClientError as exc:
                if inflight.aborted:
                    chunk = b""
                else:
                    raise self._connection_failed(exc, "") from None
            if inflight.aborted:
                yield EngineOutput("", 0, state.prompt_tokens, "abort")
                return
            events = parser.feed(chunk) if chunk else parser.close()
            state.got_bytes = state.got_bytes or bool(chunk)
            for data in events:
                try:
                    output = self.on_event(data, state)
                except TroupeError as exc:
                    raise self._mid_stream(exc, secret) from None
                if output is not None:
                    yield output
                if state.done:
                    yield self._final(state)
                    return
            if not chunk:
                if state.finish_reason is not None:
                    yield self._final(state)  # ended without an end marker: accept it
                    return
                raise UpstreamFailure(InferenceFailed(
                    f"The upstream stream for model '{self.model_id}' ended before the "
                    "answer finished. Retrying may help.",
                    details={"provider": self.provider, "tokens_received": state.reported},
                ), retryable=True, breaker=True)

    async def _read_json(
        self, inflight: _Inflight, response: aiohttp.ClientResponse, clock: Deadlines,
        state: StreamState, secret: str,
    ) -> AsyncIterator[EngineOutput]:
        wait, phase = clock.first_byte()
        try:
            raw = await asyncio.wait_for(response.read(), wait)
            body = json.loads(raw)
        except asyncio.TimeoutError:
            raise self._timeout(phase, clock.limit(phase), True) from None
        except aiohttp.ClientError as exc:
            raise self._connection_failed(exc, "") from None
        except ValueError:
            raise UpstreamFailure(InferenceFailed(
                f"The upstream provider of model '{self.model_id}' sent a body that is not "
                "JSON.", details={"provider": self.provider}), retryable=True) from None
        try:
            outputs = self.on_json(body, state)
        except TroupeError as exc:
            raise self._mid_stream(exc, secret) from None
        for out in outputs:
            yield out
        yield self._final(state)

    def _mid_stream(self, exc: TroupeError, secret: str) -> UpstreamFailure:
        exc.message = scrub(exc.message, secret)
        exc.details = scrub(exc.details, secret)
        terminal = isinstance(exc, (InvalidRequest, PaymentRequired, AuthorizationFailed))
        return UpstreamFailure(exc, retryable=not terminal, breaker=not terminal)

    def _final(self, state: StreamState) -> EngineOutput:
        if state.finish_reason is None:
            raise UpstreamFailure(InferenceFailed(
                f"The upstream stream for model '{self.model_id}' ended without a finish "
                "reason. Retrying may help.",
                details={"provider": self.provider},
            ), retryable=True, breaker=True)
        correction = 0
        if state.completion_tokens is not None:
            correction = max(0, state.completion_tokens - state.reported)
        return EngineOutput("", correction, state.prompt_tokens, state.finish_reason)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ errors

    def _timeout(self, phase: str, limit_s: float, retryable: bool) -> UpstreamFailure:
        return UpstreamFailure(Timeout(
            f"The upstream provider of model '{self.model_id}' did not answer in time "
            f"(phase {phase}: no progress within {limit_s:g}s). Retrying may help; the "
            f"limits are the engine's *_timeout_s settings.",
            details={"phase": phase, "timeout_s": limit_s, "provider": self.provider},
        ), retryable=retryable, breaker=True)

    def _connection_failed(self, exc: BaseException, url: str) -> UpstreamFailure:
        where = f" at {url.split('?')[0]}" if url else ""
        return UpstreamFailure(InferenceFailed(
            f"Could not reach the upstream provider of model '{self.model_id}'{where}: "
            f"{type(exc).__name__}. Check base_url and the network; retrying may help.",
            details={"provider": self.provider, "exception": type(exc).__name__},
        ), retryable=True, breaker=True)

    async def _upstream_error(
        self, response: aiohttp.ClientResponse, clock: Deadlines, secret: str
    ) -> UpstreamFailure:
        """Map an upstream non-200 answer to a classified failure."""
        status = response.status
        try:
            wait, _ = clock.idle()
            raw = await asyncio.wait_for(response.content.read(MAX_ERROR_BODY), wait)
            text = raw.decode("utf-8", "replace")
        except (asyncio.TimeoutError, aiohttp.ClientError):
            text = ""
        text = scrub(text, secret)
        try:
            error = self.provider_error(json.loads(text))
        except ValueError:
            error = {}
        if not error and text:
            error = {"message": text[:MAX_ERROR_TEXT]}
        error = trim(scrub(error, secret))
        hint = retry_after_seconds(response.headers)
        specific = self.classify_error(status, error, response.headers)
        retryable = status in RETRYABLE_STATUS
        breaker = status >= 500 or status == 408
        if specific is not None:
            specific.details = {"provider": self.provider, "upstream_status": status,
                                "upstream_error": error, **specific.details}
            auth = status == 401 or isinstance(specific, AuthenticationFailed)
            if auth or isinstance(specific, (InvalidRequest, PaymentRequired)):
                retryable = breaker = False
            return UpstreamFailure(specific, retryable=retryable, retry_after_s=hint,
                                   auth=auth, breaker=breaker)
        return UpstreamFailure(
            self._by_status(status, error, hint),
            retryable=retryable, retry_after_s=hint, auth=status == 401, breaker=breaker,
        )

    def _by_status(self, status: int, error: dict[str, Any], hint: Optional[float]) -> TroupeError:
        message = str(error.get("message") or f"HTTP {status}")
        details = {"provider": self.provider, "upstream_status": status, "upstream_error": error}
        where = f"The upstream provider of model '{self.model_id}'"
        if status == 401:
            return AuthenticationFailed(
                f"{where} rejected the API key (credential {self.config.credential_name!r}, "
                f"env ${self.config.api_key_env}): {message}. Set a valid key in that variable, "
                "the secrets file, or with POST /admin/credentials.",
                details=details,
            )
        if status == 402:
            return PaymentRequired(
                f"{where} refused the request for billing reasons: {message}. Check the "
                "provider account's plan and credits.",
                details=details,
            )
        if status == 403:
            return AuthorizationFailed(
                f"{where} refused access: {message}. Check the key's project, "
                "organization and model permissions.",
                details=details,
            )
        if status == 429:
            return RateLimitExceeded(
                f"{where} is rate limiting requests: {message}. Retry after the "
                "Retry-After delay.",
                details=details,
                retry_after_s=hint,
            )
        if status == 408 or status >= 500:
            return InferenceFailed(
                f"{where} failed with HTTP {status}: {message}. Retrying may help.",
                details=details,
                retry_after_s=hint,
            )
        return InvalidRequest(
            f"{where} rejected the request with HTTP {status}: {message}.",
            param=error.get("param") if isinstance(error.get("param"), str) else None,
            details=details,
        )

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


def _current_task_cancelling() -> bool:
    task = asyncio.current_task()
    return bool(task is not None and task.cancelling())


def _count_metric(name: str, provider: str) -> None:
    """Add 1 to a custom counter on the metrics actor (fire-and-forget; rare events only)."""
    try:
        import ray

        if not ray.is_initialized():
            return
        from actors.names import METRICS_ACTOR, NAMESPACE

        actor = ray.get_actor(METRICS_ACTOR, namespace=NAMESPACE)
        actor.record_custom.remote(name, "counter", 1, {"provider": provider})
    except Exception:  # metrics must never fail a request
        logger.debug("could not count %s", name, exc_info=True)


async def unary_json(
    engine: RemoteEngine, url: str, headers_for: Any, body: dict[str, Any]
) -> Any:
    """One non-streaming JSON call (e.g. embeddings) with the engine's credentials,
    timeouts, retries, breaker and classification; returns the decoded JSON body."""
    if engine._session is None or engine._creds is None:
        raise InferenceFailed(f"The engine for model '{engine.model_id}' is not started.")
    snapshot = engine._creds.current()
    plan = _Plan(snapshot, engine._credential(snapshot),
                 time.monotonic() + engine.config.total_timeout_s)
    while True:
        breaker, probe = engine._acquire(plan.cred)
        verdict = False
        inflight = _Inflight()
        clock = Deadlines(engine.config, plan.total_end)
        secret = plan.cred.secret
        try:
            response = await engine._open(
                inflight, UpstreamCall(url, headers_for(secret), body), clock, secret)
            assert response is not None
            try:
                wait, phase = clock.first_byte()
                raw = await asyncio.wait_for(response.read(), wait)
            except asyncio.TimeoutError:
                raise engine._timeout(phase, clock.limit(phase), True) from None
            finally:
                response.close()
            breaker.success(probe)
            verdict = True
            return json.loads(raw)
        except UpstreamFailure as failure:
            (breaker.failure if failure.breaker else breaker.release)(probe)
            verdict = True
            delay = await engine._after_failure(plan, failure, False)
            if delay:
                await asyncio.sleep(delay)
        finally:
            if not verdict:
                breaker.release(probe)


@dataclass
class _Plan:
    """One request's credential and retry state (the key is the request's for life,
    except for one refresh after a 401)."""

    snapshot: Any
    cred: Any
    total_end: float
    attempt: int = 0
    auth_refreshed: bool = False


__all__.append("unary_json")

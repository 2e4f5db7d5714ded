"""The one retry loop of the remote transport, shared by streaming and unary calls:
credentials, circuit breaker and backoff around the attempts of one request.

* **Credentials**: a request captures the process's current credential snapshot at
  start (:mod:`actors.session`) and keeps it for its whole life, retries included. The
  one exception is an upstream 401: the loop asks for a newer snapshot once and, when
  the key changed, retries on it (counted in ``auth_refreshes``); otherwise the request
  ends with AUTHENTICATION_FAILED.
* **Retries** with exponential backoff and full jitter on 408/409/429/5xx, connection
  errors and first-byte timeouts, honoring ``Retry-After`` (a hint longer than
  ``retry.max_retry_after_s`` ends the request at once with the hint), and only while
  nothing has been yielded yet, so a client never sees a duplicated or spliced answer.
* **Circuit breaker** per provider and key fingerprint: ``failure_threshold``
  consecutive failures (5xx, 408, timeouts, connection errors) open it; while open,
  requests fail at once with 503 OVERLOADED and ``Retry-After``; after
  ``reset_timeout_s`` up to ``half_open_probes`` requests probe it; a success (the first
  item of an attempt) closes it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from typing import Any, AsyncGenerator, Awaitable, Callable, Protocol, TypeVar

from deployments.engines.remote.breaker import CircuitBreaker, shared_breaker
from deployments.engines.remote.errors import UpstreamFailure
from deployments.engines.remote.transport import Deadlines
from deployments.engines.remote.upstream_util import backoff_delay
from serve_app.errors import AuthenticationFailed, Overloaded

__all__ = ["RetryLoop", "RetryHost", "Attempt"]

logger = logging.getLogger("deployments.engines.remote")

T = TypeVar("T")
#: One attempt: given the key's secret and the attempt's deadlines, its items.
Attempt = Callable[[str, Deadlines], AsyncGenerator[T, None]]


class RetryHost(Protocol):
    """What the loop reads of the engine it retries for (a :class:`RemoteEngine`): its
    config, identity, credential source, breakers per key, counters and random source."""

    config: Any
    model_id: str
    counters: dict[str, int]
    _creds: Any
    _breakers: dict[str, CircuitBreaker]
    _rng: random.Random

    @property
    def provider(self) -> str: ...


class RetryLoop:
    """The attempts of one request (the key is the request's for life, except for one
    refresh after a 401). Raises AUTHENTICATION_FAILED at once when there is no key."""

    def __init__(self, engine: RetryHost, total_end: float) -> None:
        self.engine = engine
        self.snapshot = engine._creds.current()  # captured once: the key of this request's life
        self.cred = self._credential(self.snapshot)
        self.total_end = total_end
        self.attempt = 0
        self.auth_refreshed = False

    async def run(
        self, attempt: Attempt[T], sleep: Callable[[float], Awaitable[bool]]
    ) -> AsyncGenerator[T, None]:
        """Yield the items of the first attempt that does not fail before its first item.

        Retries follow the module docstring; a failure after an item was yielded, or one
        not worth another attempt, raises its Troupe error. Ends without an item when
        ``sleep`` (the backoff) returns False: the request was aborted meanwhile.
        """
        yielded = False
        while True:
            breaker, probe = self._acquire()
            verdict = False  # whether this attempt already told the breaker its outcome
            try:
                clock = Deadlines(self.engine.config, self.total_end)
                async with contextlib.aclosing(attempt(self.cred.secret, clock)) as items:
                    async for item in items:
                        if not verdict:
                            # The first item is about to reach the caller: the upstream is
                            # healthy, and no retry may happen from now on.
                            breaker.success(probe)
                            verdict = True
                        yielded = True
                        yield item
                return
            except UpstreamFailure as failure:
                if not verdict:
                    (breaker.failure if failure.breaker else breaker.release)(probe)
                    verdict = True
                delay = await self._after_failure(failure, yielded)
                if delay and not await sleep(delay):
                    return
            finally:
                if not verdict:
                    breaker.release(probe)

    # ------------------------------------------------------------------ credentials

    def _credential(self, snapshot: Any) -> Any:
        engine = self.engine
        name = engine.config.credential_name
        cred = snapshot.get(name)
        if cred is None:
            env = snapshot.envs.get(name) or engine.config.api_key_env
            raise AuthenticationFailed(
                f"No API key for the upstream provider of model '{engine.model_id}' "
                f"(credential {name!r}): the environment variable {env} is not set or "
                "empty, and no key was set in the secrets file or with POST "
                f"/admin/credentials. Set one, e.g. `export {env}=...`.",
                details={"provider": engine.provider, "credential": name, "api_key_env": env},
            )
        return cred

    async def _refreshed(self) -> bool:
        """After a 401: a newer snapshot whose key changed becomes this request's."""
        engine = self.engine
        fresh = await engine._creds.refresh_after_auth_failure(self.snapshot)
        new = fresh.get(engine.config.credential_name)
        if new is None or new.fingerprint == self.cred.fingerprint:
            return False
        engine.counters["auth_refreshes"] += 1
        count_metric("remote_auth_refresh_total", engine.provider)
        logger.info("model %s: upstream 401 with key %s; retrying once with %s",
                    engine.model_id, self.cred.fingerprint, new.fingerprint)
        self.auth_refreshed, self.snapshot, self.cred = True, fresh, new
        return True

    # ------------------------------------------------------------------ breaker

    def _breaker(self) -> CircuitBreaker:
        """The breaker of (provider, base URL, key), shared by every engine of this process
        that calls the same upstream with the same key (the first one's settings win)."""
        engine = self.engine
        key = f"{engine.provider}:{self.cred.fingerprint}"
        breaker = engine._breakers.get(key)
        if breaker is None:
            shared = f"{key}@{getattr(engine.config, 'base_url', '')}"
            breaker = engine._breakers[key] = shared_breaker(shared, engine.config.breaker)
        return breaker

    def _acquire(self) -> tuple[CircuitBreaker, bool]:
        """The breaker for this request's key and whether this attempt is a half-open
        probe; raises OVERLOADED (503 + Retry-After) at once while it is open."""
        breaker = self._breaker()
        probe = breaker.acquire()
        if probe is None:
            engine = self.engine
            engine.counters["breaker_rejections"] += 1
            raise Overloaded(
                f"The upstream provider of model '{engine.model_id}' is failing: its circuit "
                "breaker is open after repeated errors. Retry after the Retry-After delay.",
                retry_after_s=max(1.0, breaker.retry_in()),
                status=503,
                details={"provider": engine.provider, "breaker": "open",
                         "key_fingerprint": self.cred.fingerprint},
            )
        return breaker, probe

    # ------------------------------------------------------------------ backoff

    async def _after_failure(self, failure: UpstreamFailure, yielded: bool) -> float:
        """Decide what follows a failed attempt: seconds to wait before the next one (0 for
        a retry on a refreshed key), or raise the failure's error."""
        if failure.auth and not self.auth_refreshed and not yielded and await self._refreshed():
            return 0.0
        engine = self.engine
        retry = engine.config.retry
        hint = failure.retry_after_s
        if yielded or not failure.retryable or self.attempt >= retry.max_retries or (
            hint is not None and hint > retry.max_retry_after_s
        ):
            raise failure.error from None
        delay = backoff_delay(self.attempt, retry.backoff_base_s, retry.backoff_max_s,
                              engine._rng)
        delay = max(delay, hint or 0.0)
        if time.monotonic() + delay >= self.total_end:
            raise failure.error from None
        self.attempt += 1
        engine.counters["retries"] += 1
        return delay


def count_metric(name: str, provider: str) -> None:
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

"""Rate limits per key at a gateway replica: leases from the quota actor, admitted locally.

Per request the replica only decrements a local allowance; it calls the quota actor
(:mod:`actors.quota`) when a block is used up, once per ``lease_fraction`` of a limit.
Tokens per minute are charged after the fact from real usage (reported with the next
lease, or by a flusher every half second); a key is refused while its window's token
balance is spent. Concurrency slots are leased in blocks and given back when idle.

Every admitted response carries ``X-RateLimit-Limit``, ``-Remaining``, ``-Reset`` (unix
seconds of the window's end) and ``-Reset-After`` (seconds), for the request-per-minute
limit (else per-hour, else tokens, else concurrency); a refusal is 429
``RATE_LIMIT_EXCEEDED`` with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from serve_app.errors import RateLimitExceeded
from serve_app.policies.context import Principal
from serve_app.settings.policies import LimitsSettings, RateLimits

__all__ = ["RateLimiter", "Admission", "QuotaClient"]

logger = logging.getLogger("troupe.limits")

FLUSH_INTERVAL_S = 0.5
QUOTA_TIMEOUT_S = 2.0  # an actor that cannot answer must not hang requests
QUOTA_START_TIMEOUT_S = 60.0  # its first call: the actor may start with it


class QuotaClient:
    """Calls the quota actor (a Ray handle) or a local QuotaActor (tests), the same way.

    ``target`` may also create the actor on first use (``serve_app.build.actors``, a
    ``LazyActor`` with ``started``): it is touched only once limits apply, never here.
    """

    def __init__(self, target: Any) -> None:
        self.target = target
        self._answered = False
        self._starting: Optional[asyncio.Future] = None
        self._creating = asyncio.Lock()  # one thread creates it (LazyActor is not thread-safe)

    def warm(self) -> None:
        """Start the actor now, in the background: limits apply to some key, and its first
        lease should not wait seconds for a process to start (nor stall this replica)."""
        if self._starting is None and not self._answered:
            self._starting = asyncio.ensure_future(self._warm())

    async def _warm(self) -> None:
        try:
            await self.call("ready")
        except Exception as exc:  # the first lease tries again, and reports it
            logger.info("quota actor not started ahead (%s)", type(exc).__name__)

    async def _method(self, method: str) -> Any:
        if getattr(self.target, "started", True):
            return getattr(self.target, method)
        async with self._creating:
            # Creating a named actor blocks on the cluster's control store: not in the loop.
            return await asyncio.to_thread(getattr, self.target, method)

    async def call(self, method: str, *args: Any) -> Any:
        fn = await self._method(method)
        if hasattr(fn, "remote"):
            # Until the actor first answers, its process may still be starting.
            limit = QUOTA_TIMEOUT_S if self._answered else QUOTA_START_TIMEOUT_S
            async with asyncio.timeout(limit):
                result = await fn.remote(*args)
            self._answered = True
            return result
        return fn(*args)


@dataclass
class _Lease:
    allowance: int = 0
    remaining: int = 0      # what the actor had left after the last grant
    reset_at: float = 0.0   # local clock
    window_end: float = 0.0  # the actor's clock: what X-RateLimit-Reset reports


@dataclass
class _KeyState:
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    leases: dict[str, _Lease] = field(default_factory=dict)
    tokens_remaining: Optional[int] = None
    tokens_reset_at: float = 0.0
    tokens_window_end: float = 0.0
    tokens_pending: int = 0
    held: int = 0
    in_use: int = 0
    tpm: Optional[int] = None  # the token limit usage is reported against


@dataclass
class Admission:
    """One admitted request: the headers to add and what to give back when it ends."""

    key_id: str
    limits: RateLimits
    headers: list[tuple[bytes, bytes]]
    slot: bool = False


def _headers(limit: int, remaining: int, reset_at: float, now: float,
             window_end: Optional[float] = None) -> list[tuple[bytes, bytes]]:
    """``reset_at``: the window's end on this replica's clock (for Reset-After);
    ``window_end``: the same end as the quota actor counts it (for Reset), if known."""
    return [
        (b"x-ratelimit-limit", str(limit).encode()),
        (b"x-ratelimit-remaining", str(max(0, remaining)).encode()),
        (b"x-ratelimit-reset", str(math.ceil(window_end or reset_at)).encode()),
        (b"x-ratelimit-reset-after", str(max(0, math.ceil(reset_at - now))).encode()),
    ]


class RateLimiter:
    """Per-replica admission against limits counted by the quota actor."""

    def __init__(self, settings: LimitsSettings, quota: QuotaClient) -> None:
        self.settings = settings
        self.quota = quota
        self.states: dict[str, _KeyState] = {}
        self._flusher: Optional[asyncio.Task] = None
        self._warned_at = 0.0

    def prepare(self, keys_have_limits: bool) -> None:
        """Start the quota actor ahead once limits apply to some key (the defaults, or a
        key's own): an app whose keys have none never runs it (issue 20)."""
        if keys_have_limits or self.settings.default.any():
            self.quota.warm()

    def limits_for(self, principal: Principal) -> RateLimits:
        if not principal.limits:
            return self.settings.default
        return self.settings.default.merged(principal.limits)

    def _request_windows(self, limits: RateLimits) -> dict[str, tuple[int, float]]:
        out = {}
        if limits.requests_per_minute:
            out["minute"] = (limits.requests_per_minute, self.settings.minute_s)
        if limits.requests_per_hour:
            out["hour"] = (limits.requests_per_hour, self.settings.hour_s)
        return out

    def _want(self, limit: int, lease: _Lease, now: float) -> int:
        left = limit if now >= lease.reset_at else lease.remaining
        block = math.ceil(limit * self.settings.lease_fraction)
        # Smaller blocks as the window runs out, so little is stranded at other replicas.
        return max(1, min(block, math.ceil(left / 8)))

    async def admit(self, principal: Principal) -> Optional[Admission]:
        """Admit one request or raise RateLimitExceeded (None: no limit applies)."""
        limits = self.limits_for(principal)
        if not limits.any():
            return None
        key = principal.key_id
        state = self.states.get(key)
        if state is None:
            state = self.states[key] = _KeyState()
        now = time.time()
        tpm = state.tpm = limits.tokens_per_minute
        if tpm and state.tokens_remaining is not None and state.tokens_remaining <= 0 \
                and now < state.tokens_reset_at:
            raise self._refusal("tokens per minute", tpm, state.tokens_reset_at, now,
                                state.tokens_window_end)
        windows = self._request_windows(limits)
        if windows:
            now = await self._take_request(key, state, limits, windows, now)
        slot = False
        if limits.concurrent_requests:
            await self._take_slot(key, state, limits.concurrent_requests)
            slot = True
        return Admission(key, limits, self._report(state, limits, windows, now), slot)

    async def _take_request(self, key: str, state: _KeyState, limits: RateLimits,
                            windows: dict[str, tuple[int, float]], now: float) -> float:
        """Take one request from every window's lease; returns the time it was admitted."""
        def usable() -> bool:
            return all((lease := state.leases.get(kind)) is not None and lease.allowance > 0
                       and now < lease.reset_at for kind in windows)

        if not usable():
            async with state.lock:
                now = time.time()
                if not usable():
                    # The call may take seconds (the actor starting): judge by its answer's time.
                    now = await self._lease(key, state, limits, windows, now)
                    if not usable():
                        kind, (limit, _len) = min(
                            ((k, w) for k, w in windows.items()
                             if state.leases[k].remaining <= 0 or state.leases[k].allowance <= 0),
                            key=lambda kw: state.leases[kw[0]].reset_at,
                            default=next(iter(windows.items())),
                        )
                        label = "requests per minute" if kind == "minute" else "requests per hour"
                        lease = state.leases[kind]
                        raise self._refusal(label, limit, lease.reset_at, now, lease.window_end)
        for kind in windows:
            state.leases[kind].allowance -= 1
        return now

    async def _lease(self, key: str, state: _KeyState, limits: RateLimits,
                     windows: dict[str, tuple[int, float]], now: float) -> float:
        """Lease a block for every window; returns the local time its answer arrived."""
        requests = {}
        for kind, (limit, length) in windows.items():
            lease = state.leases.setdefault(kind, _Lease())
            requests[kind] = (limit, length, self._want(limit, lease, now))
        tokens = None
        if limits.tokens_per_minute:
            tokens = (limits.tokens_per_minute, self.settings.minute_s, state.tokens_pending)
            state.tokens_pending = 0
        try:
            result = await self.quota.call("lease", key, requests, tokens)
        except Exception as exc:  # the actor is restarting: admit rather than fail everyone
            self._warn(exc)
            now = time.time()
            for kind in windows:
                state.leases[kind] = _Lease(1, 1, now + 1.0)
            return now
        now = time.time()
        self._apply(state, result, now)
        return now

    def _apply(self, state: _KeyState, result: dict[str, Any], now: float) -> None:
        """Take in the actor's answer; ``now``: when it arrived (not when it was asked:
        the first call waits for the actor's process to start, seconds under load)."""
        # The actor's clock minus ours, up to the answer's way back (milliseconds).
        offset = result["now"] - now
        for kind, (remaining, reset_at) in result["windows"].items():
            lease = state.leases.setdefault(kind, _Lease())
            if reset_at != lease.window_end:
                lease.allowance = 0  # a block of an ended window is void
            lease.allowance += result["granted"]
            lease.remaining = remaining
            lease.reset_at = reset_at - offset
            lease.window_end = reset_at
        if result.get("tokens") is not None:
            remaining, reset_at = result["tokens"]
            state.tokens_remaining = remaining
            state.tokens_reset_at = reset_at - offset
            state.tokens_window_end = reset_at

    async def _take_slot(self, key: str, state: _KeyState, limit: int) -> None:
        if state.in_use < state.held:
            state.in_use += 1
            return
        async with state.lock:
            if state.in_use >= state.held:
                want = max(1, math.ceil(limit * self.settings.lease_fraction))
                try:
                    state.held += await self.quota.call("acquire", key, limit, want)
                except Exception as exc:
                    self._warn(exc)
                    state.held += 1
            if state.in_use >= state.held:
                raise RateLimitExceeded(
                    f"Too many concurrent requests for this key (limit {limit}). Wait for one "
                    "to finish, then retry.",
                    retry_after_s=1, details={"limit": limit, "limit_kind": "concurrent requests"},
                )
            state.in_use += 1

    def finish(self, admission: Admission, tokens: int) -> None:
        """The request ended: charge its tokens, give back its concurrency slot."""
        state = self.states[admission.key_id]
        if admission.limits.tokens_per_minute and tokens:
            state.tokens_pending += tokens
            if state.tokens_remaining is not None:
                state.tokens_remaining -= tokens  # local view until the next report
            self._ensure_flusher()
        if admission.slot:
            state.in_use -= 1
            spare = max(1, math.ceil((admission.limits.concurrent_requests or 1)
                                     * self.settings.lease_fraction))
            extra = state.held - state.in_use if state.in_use == 0 else \
                state.held - state.in_use - spare
            if extra > 0:
                state.held -= extra
                asyncio.ensure_future(self._release(admission.key_id, extra))

    async def _release(self, key: str, n: int) -> None:
        try:
            await self.quota.call("release", key, n)
        except Exception as exc:
            self._warn(exc)

    def _ensure_flusher(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.ensure_future(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(FLUSH_INTERVAL_S)
        for key, state in list(self.states.items()):
            if state.tokens_pending <= 0:
                continue
            pending, state.tokens_pending = state.tokens_pending, 0
            tpm = state.tpm or 1
            try:
                result = await self.quota.call(
                    "lease", key, {}, (tpm, self.settings.minute_s, pending))
            except Exception as exc:
                state.tokens_pending += pending
                self._warn(exc)
                continue
            self._apply(state, result, time.time())

    def _report(self, state: _KeyState, limits: RateLimits,
                windows: dict[str, tuple[int, float]], now: float) -> list[tuple[bytes, bytes]]:
        for kind, (limit, _length) in windows.items():
            lease = state.leases[kind]
            return _headers(limit, lease.remaining + lease.allowance, lease.reset_at, now,
                            lease.window_end)
        if limits.tokens_per_minute:
            if state.tokens_reset_at > now:
                reset, end = state.tokens_reset_at, state.tokens_window_end
            else:
                reset = end = math.floor(now / self.settings.minute_s + 1) * self.settings.minute_s
            remaining = state.tokens_remaining if state.tokens_remaining is not None \
                else limits.tokens_per_minute
            return _headers(limits.tokens_per_minute, remaining, reset, now, end)
        limit = limits.concurrent_requests or 0
        return _headers(limit, limit - state.in_use, now, now)

    def _refusal(self, what: str, limit: int, reset_at: float, now: float,
                 window_end: Optional[float] = None) -> RateLimitExceeded:
        wait = max(0.001, reset_at - now)
        err = RateLimitExceeded(
            f"Rate limit exceeded: this key may make {limit} {what}. Retry in "
            f"{math.ceil(wait)}s (Retry-After), or ask an admin for a higher limit.",
            retry_after_s=wait,
            details={"limit": limit, "limit_kind": what, "retry_after_s": round(wait, 3)},
        )
        err.rate_headers = _headers(limit, 0, reset_at, now, window_end)
        return err

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at > 60:
            self._warned_at = now
            logger.warning("quota actor unreachable (%s): admitting without cluster limits",
                           type(exc).__name__)

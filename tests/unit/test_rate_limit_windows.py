"""Exact rate-limit windows across gateway replicas when the quota actor starts lazily.

The quota actor starts with the first rate-limited request (issue 20), so that request's
lease call waits seconds for a process to start. The replicas must still admit exactly
the limit in every window the actor counts, report that window's end, and refuse the
rest with an honest Retry-After. A fake clock stands for time; the actor is the real
QuotaActor behind a handle that answers like Ray's (``method.remote(...)``, awaited).
"""

from __future__ import annotations

import asyncio
import collections
import math
import types
from typing import Any

import pytest

from actors.quota import QuotaActor
from serve_app.errors import RateLimitExceeded
from serve_app.policies import ratelimit
from serve_app.policies.context import Principal
from serve_app.policies.ratelimit import QuotaClient, RateLimiter
from serve_app.settings.policies import LimitsSettings

LIMIT = 100
WINDOW_S = 5.0
START_S = 3.0      # the actor's process starting, under load
STEP_S = 0.02      # time between rounds of requests
CLIENTS = 6        # concurrent requests per replica and round


class Clock:
    """Replica time (``time.time`` of the limiter); the actor's clock is ``skew`` ahead."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class StartingActor:
    """The named quota actor as each replica's handle reaches it: its first call starts
    its process, and that answer comes ``START_S`` later."""

    def __init__(self, clock: Clock, skew: float) -> None:
        self.actor = QuotaActor()
        self.clock = clock
        self.skew = skew
        self.started = False

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return types.SimpleNamespace(remote=lambda *args: self._answer(name, args))

    async def _answer(self, name: str, args: tuple[Any, ...]) -> Any:
        if not self.started:
            self.started = True
            self.clock.now += START_S
        await asyncio.sleep(0)  # an answer comes in a later loop turn, as over Ray
        if name == "lease":
            return self.actor.lease(*args, now=self.clock() + self.skew)
        return getattr(self.actor, name)(*args)


@pytest.mark.parametrize("skew", [0.0, 0.4, -0.4])
async def test_two_replicas_admit_exactly_the_limit_per_window_from_a_lazy_actor(
        monkeypatch: pytest.MonkeyPatch, skew: float) -> None:
    clock = Clock(1001.0)  # a second into the window that ends at 1005
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(time=clock))
    settings = LimitsSettings.model_validate(
        {"default": {"requests_per_minute": LIMIT}, "minute_s": WINDOW_S})
    actor = StartingActor(clock, skew)
    replicas = [RateLimiter(settings, QuotaClient(actor)) for _ in range(2)]
    principal = Principal("key-1", "workspace")
    admitted: collections.Counter[int] = collections.Counter()
    refused = 0

    async def one(limiter: RateLimiter) -> None:
        nonlocal refused
        asked = clock()
        try:
            admission = await limiter.admit(principal)
        except RateLimitExceeded as err:
            refused += 1
            headers = dict(err.rate_headers)
            reset = int(headers[b"x-ratelimit-reset"])
            assert reset % WINDOW_S == 0, headers
            # Retry-After: until that window ends on this replica's clock.
            assert clock() + err.retry_after_s == pytest.approx(reset - skew)
            return
        assert admission is not None
        headers = dict(admission.headers)
        reset = int(headers[b"x-ratelimit-reset"])
        # The window the actor counted this request in, not one shifted by the start.
        assert reset % WINDOW_S == 0, (asked, clock(), headers)
        assert reset - skew > clock() >= reset - skew - WINDOW_S
        assert int(headers[b"x-ratelimit-reset-after"]) == math.ceil(reset - skew - clock())
        admitted[reset] += 1

    while clock() < 1015.0:
        await asyncio.gather(*(one(r) for r in replicas for _ in range(CLIENTS)))
        clock.now += STEP_S
    # Traffic (600 a second) exceeded the limit in every window, the actor's start included.
    assert dict(admitted) == {1005: LIMIT, 1010: LIMIT, 1015: LIMIT, 1020: LIMIT} \
        if skew > 0 else {1005: LIMIT, 1010: LIMIT, 1015: LIMIT}
    assert refused > 0

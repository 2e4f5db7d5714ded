"""Fewer idle Ray processes (issue 20): the quota actor starts only once a key has rate
limits, and a single gateway keeps model load state in its own process and file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actors.quota import QuotaActor
from serve_app.build.actors import LazyActor
from serve_app.gateway.model_state import MemoryModelState
from serve_app.policies.ratelimit import QuotaClient
from tests.unit.gateway_fakes import assert_openai_error, chat_body, eventually
from tests.unit.test_policies import PolicyGateway


class CountingQuota:
    """Creates the (local) quota actor on demand and counts how often it was asked to."""

    def __init__(self) -> None:
        self.created: list[QuotaActor] = []

    def __call__(self) -> Any:
        self.created.append(QuotaActor())
        return self.created[-1]


async def test_no_quota_actor_until_a_key_has_limits(tmp_path: Path) -> None:
    factory = CountingQuota()
    gateway = PolicyGateway(tmp_path)
    # What the builder hands the policy layer (serve_app.build.actors.quota_actor_handle).
    gateway.layer.limiter.quota = QuotaClient(LazyActor(factory))
    try:
        plain = await gateway.key()
        body = chat_body(model="mock-fast")
        for _ in range(3):
            assert (await gateway.post("/v1/chat/completions", plain, json=body)).status_code == 200
        assert factory.created == []  # no key has limits: no actor
        # A key with limits appears (a reload): the actor starts before its first request,
        # which then does not wait for a process to start.
        limited = await gateway.key(limits={"requests_per_minute": 2})
        await eventually(lambda: len(factory.created) == 1)
        for _ in range(2):
            r = await gateway.post("/v1/chat/completions", limited, json=body)
            assert r.status_code == 200
        assert_openai_error(await gateway.post("/v1/chat/completions", limited, json=body),
                            429, "rate_limit_exceeded")
        assert len(factory.created) == 1  # created once, then reused
    finally:
        await gateway.close()


async def test_a_single_gateways_model_state_survives_a_restart_in_its_file(
        tmp_path: Path) -> None:
    path = str(tmp_path / "state" / "model_state.json")
    first = MemoryModelState(path)
    await first.set("whisper", False)
    restarted = MemoryModelState(path)  # a new replica (or a redeploy) of the same app
    assert await restarted.get_all() == {"whisper": False}
    version, state = await restarted.watch(None, 0.0)
    assert state == {"whisper": False}

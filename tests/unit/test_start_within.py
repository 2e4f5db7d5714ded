"""start_within: validation, flex-then-standard fallback on a real fake upstream (engines
in the gateway process via LocalHandle, no Ray), tier metering and flex pricing."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest

from deployments.llm import LLMDeployment
from serve_app.build.app import build_fastapi_app
from serve_app.settings import TroupeSettings
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.deadline import apply_start_within, parse_duration
from serve_app.errors import InvalidRequest
from serve_app.build.local_handle import LocalHandle
from serve_app.pricing import PriceTable
from serve_app.protocol.internal import GenerationRequest
from serve_app.protocol.metrics import RequestEvent
from tests.fake_openai import FakeOpenAI

KEY_ENV = "TROUPE_TEST_START_WITHIN_KEY"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def settings(fake_url: str) -> TroupeSettings:
    remote = {"type": "openai", "base_url": fake_url, "model": "gpt-4o-mini",
              "api_key_env": KEY_ENV, "credential": "start-within-test",
              "retry": {"max_retries": 0}}
    return TroupeSettings.model_validate({"models": [
        {"id": "gpt", "engine": remote, "run_in": "gateway"},
        {"id": "gpt-noflex", "engine": {**remote, "flex_tier": False}, "run_in": "gateway"},
        {"id": "claude", "engine": {"type": "anthropic", "model": "claude-x",
                                    "api_key_env": KEY_ENV, "credential": "start-within-a"},
         "run_in": "gateway"},
        {"id": "gem", "engine": {"type": "gemini", "model": "gemini-x", "api_key_env": KEY_ENV,
                                 "credential": "start-within-g"}, "run_in": "gateway"},
        {"id": "local", "engine": {"type": "mock", "token_delay_ms": 0}},
        # Local cheap tiers: start_within tries the flex_pool model first.
        {"id": "std-a", "engine": {"type": "mock", "token_delay_ms": 1}, "flex_pool": "spot-fast"},
        {"id": "std-b", "engine": {"type": "mock", "token_delay_ms": 1}, "flex_pool": "spot-slow"},
        {"id": "spot-fast", "engine": {"type": "mock", "token_delay_ms": 1}},
        {"id": "spot-slow", "engine": {"type": "mock", "token_delay_ms": 1,
                                       "first_token_delay_ms": 30_000}},
    ]})


@pytest.fixture
async def gw(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    monkeypatch.setenv(KEY_ENV, "sk-start-within")
    fake.wait_open_streams(0, 3)
    fake.reset()
    s = settings(fake.url)
    events: list[RequestEvent] = []
    deployments = {m.id: LLMDeployment(m) for m in s.models}
    core = GatewayCore(s, {k: LocalHandle(v) for k, v in deployments.items()},
                       record=events.append)
    app = build_fastapi_app(core)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as c:
        c.events = events  # type: ignore[attr-defined]
        yield c
    for d in deployments.values():
        await d.shutdown()


def body(model: str = "gpt", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "hello"}], **extra}


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("value, seconds", [
    ("00h-00m-05s", 5), ("00h-00m-30s", 30), ("00h-10m-00s", 600), ("0h-1m-5s", 65)])
def test_parse_duration(value, seconds):
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [
    "00h-00m-04s", "00h-10m-01s", "01h-00m-00s", "30s", "00:00:30", "00h-00m-60s", "",
    "00h-00m-30s ", "-1h-00m-00s"])
def test_parse_duration_rejects(value):
    with pytest.raises(InvalidRequest) as info:
        parse_duration(value)
    assert info.value.param == "start_within"
    assert any(hint in str(info.value) for hint in ("HHh-MMm-SSs", "between", "above 59"))


@pytest.mark.parametrize("model, extra, param", [
    ("gpt", {"start_within": "soon"}, "start_within"),
    ("gpt", {"start_within": "00h-00m-01s"}, "start_within"),
    ("gpt", {"start_within": "00h-00m-30s", "service_tier": "flex"}, "start_within"),
    ("gpt", {"start_within": 30}, "start_within"),
    ("gpt-noflex", {"start_within": "00h-00m-30s"}, "start_within"),
    ("claude", {"start_within": "00h-00m-30s"}, "start_within"),
    ("claude", {"start_within": "priority"}, "start_within"),
    ("gem", {"start_within": "auto"}, "start_within"),
    ("local", {"start_within": "00h-00m-10s"}, "start_within"),
    ("local", {"start_within": "auto"}, "start_within"),
    ("gpt", {"service_tier": "turbo"}, "service_tier"),
])
async def test_validation_is_a_clear_400(gw, model, extra, param):
    r = await gw.post("/v1/chat/completions", json=body(model, **extra))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["code"] == "invalid_request"


def test_apply_sets_tiers():
    s = settings("http://127.0.0.1:9/v1")
    req = GenerationRequest("r")
    apply_start_within(s.model("gpt"), req, "auto", None)
    assert req.service_tier == "auto" and req.start_within_s is None
    req = GenerationRequest("r")
    apply_start_within(s.model("claude"), req, "auto", None)
    assert req.service_tier == "auto"
    req = GenerationRequest("r")
    apply_start_within(s.model("local"), req, "default", None)
    assert req.service_tier is None and req.start_within_s is None
    req = GenerationRequest("r")
    apply_start_within(s.model("gpt"), req, "00h-00m-07s", None)
    assert req.start_within_s == 7 and req.service_tier is None


# ------------------------------------------------------------------ fallback


async def test_flex_serves_when_it_starts_in_time(gw, fake):
    r = await gw.post("/v1/chat/completions", json=body(start_within="00h-00m-05s"))
    assert r.status_code == 200, r.text
    tiers = [req.body.get("service_tier") for req in fake.requests]
    assert tiers == ["flex"]
    assert [(e.tier, e.finish_reason) for e in gw.events] == [("flex", "stop")]


async def test_standard_serves_when_flex_does_not_start_in_time(gw, fake):
    fake.configure(flex_headers_delay_s=30, token_delay_s=0.05, reply_tokens=4)
    started = time.monotonic()
    r = await gw.post("/v1/chat/completions", json=body(stream=True, start_within="00h-00m-05s"))
    elapsed = time.monotonic() - started
    assert r.status_code == 200 and r.text.rstrip().endswith("data: [DONE]")
    assert [req.body.get("service_tier") for req in fake.requests] == ["flex", None]
    standard_s = 4 * 0.05
    assert 5 + standard_s <= elapsed < 5 + standard_s + 1.5  # ≈ window + standard latency
    fake.wait_open_streams(0, 3)  # the flex attempt was cancelled upstream too
    by_tier = {e.tier: e for e in gw.events}
    assert by_tier["flex"].finish_reason == "cancelled"
    assert by_tier["flex"].event_id.endswith(":flex")
    assert by_tier["standard"].finish_reason == "stop" and by_tier["standard"].completion_tokens


async def test_priority_and_auto_are_sent_as_service_tier(gw, fake):
    for tier in ("priority", "auto"):
        r = await gw.post("/v1/chat/completions", json=body(start_within=tier))
        assert r.status_code == 200
        assert fake.requests[-1].body["service_tier"] == tier
    assert [e.tier for e in gw.events] == ["priority", "auto"]


def test_flex_is_priced_at_the_discount():
    s = settings("http://127.0.0.1:9/v1")
    table = PriceTable.from_models(s.models)
    std = table.price(RequestEvent("a", 0, "gpt", "/v1/chat/completions", provider="openai",
                                   tier="standard", prompt_tokens=1000, completion_tokens=1000))
    flex = table.price(RequestEvent("b", 0, "gpt", "/v1/chat/completions", provider="openai",
                                    tier="flex", prompt_tokens=1000, completion_tokens=1000))
    assert std.cost_usd > 0 and flex.cost_usd == pytest.approx(std.cost_usd * 0.5)
    assert flex.price_source.endswith("+flex-50%")


async def test_native_inference_takes_start_within_too(gw, fake):
    r = await gw.post("/inference", json={"model": "gpt", "prompt": "hi",
                                          "start_within": "00h-00m-05s"})
    assert r.status_code == 200, r.text
    assert fake.requests[-1].body["service_tier"] == "flex"
    r = await gw.post("/inference", json={"model": "local", "prompt": "hi",
                                          "start_within": "00h-00m-05s"})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "INVALID_REQUEST"
    assert r.json()["error"]["details"]["param"] == "start_within"


async def test_keys_never_reach_traces_logs_or_responses(gw, fake, caplog):
    """The gateway over a real upstream: traces, logs and bodies of good and failed
    requests (incl. a 401 whose provider message echoes the key) never hold the key."""
    import json
    import logging

    from actors.traces import TraceBuffer
    from serve_app import tracing
    from serve_app.tracing import TracingSettings

    caplog.set_level(logging.DEBUG)
    traces = TraceBuffer()
    tracing.setup_tracing(TracingSettings(otlp_endpoint=None), "test", traces.add)
    try:
        texts = []
        for extra in ({}, {"stream": True}):
            texts.append((await gw.post("/v1/chat/completions", json=body(**extra))).text)
        fake.valid_keys = {"sk-other"}  # the fake's 401 message contains the key it got
        for extra in ({}, {"stream": True}):
            r = await gw.post("/v1/chat/completions", json=body(**extra))
            assert r.status_code == 401
            texts.append(r.text)
        texts.append((await gw.post("/inference", json={"model": "gpt", "prompt": "x"})).text)
        assert tracing.flush_tracing(5.0)
        texts.append(json.dumps(traces.recent(50)))
    finally:
        tracing.shutdown_tracing()
    texts.append(caplog.text)
    assert traces.recent(50) and "sk-start-within" not in "".join(texts)


async def test_in_gateway_engine_is_cancelled_when_the_caller_leaves(fake, monkeypatch):
    """LocalHandle: closing the gateway's stream aborts the engine and the upstream."""
    import asyncio

    from serve_app.gateway.metering import RequestInfo
    from serve_app.protocol.internal import ChatMessage, SamplingParams

    monkeypatch.setenv(KEY_ENV, "sk-start-within")
    fake.reset()
    fake.configure(reply_tokens=200, token_delay_s=0.02)
    s = settings(fake.url)
    dep = LLMDeployment(s.model("gpt"))
    core = GatewayCore(s, {"gpt": LocalHandle(dep)})
    request = GenerationRequest("leave-1", SamplingParams(), [ChatMessage("user", "hi")])
    chunks = core.stream("gpt", request, RequestInfo("/test", stream=True))
    first = await chunks.__anext__()
    assert first.text and dep.engine.active_requests() == 1 and fake.open_streams == 1
    await chunks.aclose()
    for _ in range(100):
        if fake.open_streams == 0 and dep.engine.active_requests() == 0:
            break
        await asyncio.sleep(0.02)
    assert fake.open_streams == 0 and dep.engine.active_requests() == 0
    assert fake.streams_closed_by_client == 1 and core.in_flight == 0
    fake.reset()
    await dep.shutdown()


async def test_local_flex_pool_serves_when_it_starts_in_time(gw):
    r = await gw.post("/v1/chat/completions", json=body("std-a", start_within="00h-00m-05s",
                                                        max_tokens=4))
    assert r.status_code == 200, r.text
    assert [(e.model, e.tier, e.finish_reason) for e in gw.events] == [
        ("spot-fast", "flex", "length")]


async def test_local_flex_pool_that_does_not_start_falls_back(gw):
    started = time.monotonic()
    r = await gw.post("/v1/chat/completions", json=body("std-b", start_within="00h-00m-05s",
                                                        max_tokens=4))
    elapsed = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert 5 <= elapsed < 6.5
    assert sorted((e.model, e.tier, e.finish_reason) for e in gw.events) == [
        ("spot-slow", "flex", "cancelled"), ("std-b", "standard", "length")]


def test_flex_pool_must_name_another_model():
    from serve_app.settings import ConfigError, load_settings

    for pool in ("nope", "m"):
        with pytest.raises(ConfigError, match="flex_pool"):
            load_settings({"models": [{"id": "m", "engine": {"type": "mock"},
                                       "flex_pool": pool}]})


# ------------------------------------------------------------------ every caller shape

RESPONSES = {"model": "gpt", "input": "hello"}
MESSAGES = {"model": "gpt", "max_tokens": 16, "messages": [{"role": "user", "content": "hello"}]}


@pytest.mark.parametrize("route, payload", [("/v1/responses", RESPONSES),
                                            ("/v1/messages", MESSAGES)])
async def test_responses_and_messages_take_start_within(gw, fake, route, payload):
    r = await gw.post(route, json={**payload, "start_within": "00h-00m-05s"})
    assert r.status_code == 200, r.text
    assert [req.body.get("service_tier") for req in fake.requests] == ["flex"]
    assert [e.tier for e in gw.events] == ["flex"]
    r = await gw.post(route, json={**payload, "service_tier": "priority"})
    assert r.status_code == 200, r.text
    assert fake.requests[-1].body["service_tier"] == "priority"


@pytest.mark.parametrize("route, payload, model, extra", [
    ("/v1/responses", RESPONSES, "claude", {"start_within": "00h-00m-30s"}),
    ("/v1/responses", RESPONSES, "gem", {"start_within": "auto"}),
    ("/v1/responses", RESPONSES, "gpt", {"start_within": "00h-00m-30s", "service_tier": "flex"}),
    ("/v1/messages", MESSAGES, "claude", {"start_within": "00h-00m-30s"}),
    ("/v1/messages", MESSAGES, "gem", {"start_within": "auto"}),
    ("/v1/messages", MESSAGES, "gpt", {"start_within": "priority", "service_tier": "auto"}),
    ("/v1/messages", MESSAGES, "gem", {"service_tier": "priority"}),
])
async def test_responses_and_messages_validate_like_chat(gw, fake, route, payload, model, extra):
    r = await gw.post(route, json={**payload, "model": model, **extra})
    assert r.status_code == 400, r.text
    assert ("start_within" if "start_within" in extra else "service_tier") in r.text
    assert not fake.requests


def test_anthropic_standard_only_is_a_tier_of_anthropic_models():
    s = settings("http://127.0.0.1:9/v1")
    req = GenerationRequest("r")
    apply_start_within(s.model("claude"), req, None, "standard_only")
    assert req.service_tier == "standard_only"

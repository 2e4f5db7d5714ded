"""Prompt caching reaches the ledger: a remote provider's cached input tokens (OpenAI
``prompt_tokens_details.cached_tokens``, Anthropic ``cache_read_input_tokens``, Gemini
``cachedContentTokenCount``) are metered, stored and priced at the cached rate, matching
the fake's reported usage exactly. The gateway runs in-process (no Ray) over the fakes."""

from __future__ import annotations

from typing import Any, AsyncIterator, Iterator

import httpx
import pytest

from deployments.llm import LLMDeployment
from serve_app.build.app import build_fastapi_app
from serve_app.build.local_handle import LocalHandle
from serve_app.gateway.core import GatewayCore
from serve_app.pricing import PriceTable, load_list_prices
from serve_app.protocol.metrics import RequestEvent
from serve_app.settings import TroupeSettings
from serve_app.store.sqlite import SQLiteStore
from tests.fake_openai import FakeOpenAI, prompt_tokens_for
from tests.fake_providers import FakeAnthropic, FakeGemini
from tests.remote_matrix import engine

KEY_ENV = "TROUPE_TEST_CACHED_LEDGER_KEY"
PROVIDERS = ["openai", "anthropic", "gemini"]
PRICING = {"input_usd_per_million": 2.0, "cached_input_usd_per_million": 0.5,
           "output_usd_per_million": 8.0}
CACHED = 6
TURN = [{"role": "user", "content": "a fairly long prompt that the provider has cached"}]


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    with FakeOpenAI(cached_tokens=CACHED) as oai, FakeAnthropic(cached_tokens=CACHED) as claude, \
            FakeGemini(cached_tokens=CACHED) as gem:
        yield {"openai": oai, "anthropic": claude, "gemini": gem}


@pytest.fixture
async def gw(fakes: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    monkeypatch.setenv(KEY_ENV, "k-cached")
    settings = TroupeSettings.model_validate({"models": [
        {"id": f"m-{p}", "engine": engine(p, fakes, KEY_ENV), "pricing": PRICING}
        for p in PROVIDERS]})
    events: list[RequestEvent] = []
    deployments = {m.id: LLMDeployment(m) for m in settings.models}
    core = GatewayCore(settings, {k: LocalHandle(v) for k, v in deployments.items()},
                       record=events.append)
    transport = httpx.ASGITransport(app=build_fastapi_app(core))
    async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as c:
        c.events = events  # type: ignore[attr-defined]
        c.prices = PriceTable.from_models(settings.models)  # type: ignore[attr-defined]
        yield c
    for d in deployments.values():
        await d.shutdown()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("provider", PROVIDERS)
async def test_cached_tokens_are_metered_stored_and_priced(gw: Any, provider: str, stream: bool,
                                                           tmp_path: Any) -> None:
    r = await gw.post("/v1/chat/completions", json={"model": f"m-{provider}", "messages": TURN,
                                                    "stream": stream})
    assert r.status_code == 200, r.text
    prompt = prompt_tokens_for(TURN)  # what the fakes report
    if not stream:  # the caller sees the cache hit as OpenAI shows it
        usage = r.json()["usage"]
        assert usage["prompt_tokens"] == prompt
        assert usage["prompt_tokens_details"] == {"cached_tokens": CACHED}
    (event,) = gw.events
    assert (event.prompt_tokens, event.cached_tokens) == (prompt, CACHED)
    assert not event.usage_estimated
    entry = gw.prices.price(event)
    want = ((prompt - CACHED) * 2.0 + CACHED * 0.5 + event.completion_tokens * 8.0) / 1e6
    assert entry.cost_usd == want and not entry.cost_estimated
    store = SQLiteStore(tmp_path / "ledger.db")
    await store.open()
    try:
        await store.ledger_append([entry])
        (stored,) = await store.ledger_window(0, event.ts + 1)
    finally:
        await store.close()
    assert (stored.event.cached_tokens, stored.cost_usd) == (CACHED, want)


def test_list_prices_carry_cached_rates() -> None:
    prices = load_list_prices()
    for model in ("gpt-4o-mini", "claude-sonnet-4", "gemini-2.0-flash"):
        price = prices[model]
        assert price.cached_input_usd_per_million is not None
        assert price.cached_input_usd_per_million < price.input_usd_per_million
        full = price.token_cost(1000, 0)
        assert price.token_cost(1000, 0, cached_tokens=1000) < full
    assert prices["gpt-4o-mini"].token_cost(1000, 100, 800) == (
        200 * 0.15 + 800 * 0.075 + 100 * 0.60) / 1e6


async def test_messages_cache_control_reaches_anthropic(gw: Any, fakes: dict[str, Any]) -> None:
    mark = {"type": "ephemeral"}
    r = await gw.post("/v1/messages", json={
        "model": "m-anthropic", "max_tokens": 32,
        "system": [{"type": "text", "text": "A long system prompt.", "cache_control": mark}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "First part."},
            {"type": "text", "text": "Cached up to here.", "cache_control": mark}]}]})
    assert r.status_code == 200, r.text
    sent = fakes["anthropic"].requests[-1].body
    assert sent["system"] == [{"type": "text", "text": "A long system prompt.",
                               "cache_control": mark}]
    assert sent["messages"][-1]["content"][-1]["cache_control"] == mark
    usage = r.json()["usage"]  # as Anthropic reports a cache hit
    (event,) = gw.events
    assert usage["cache_read_input_tokens"] == CACHED
    assert usage["input_tokens"] + CACHED == event.prompt_tokens
    assert event.cached_tokens == CACHED


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_responses_usage_shows_cached_tokens(gw: Any, provider: str) -> None:
    r = await gw.post("/v1/responses", json={"model": f"m-{provider}", "input": TURN[0]["content"]})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["input_tokens_details"] == {"cached_tokens": CACHED}
    r = await gw.post("/v1/responses", json={"model": f"m-{provider}", "input": TURN[0]["content"],
                                             "stream": True})
    done = [line for line in r.text.splitlines() if '"response.completed"' in line]
    assert done and f'"cached_tokens": {CACHED}' in done[-1].replace('":', '": ')

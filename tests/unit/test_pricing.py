"""PriceTable: list prices, config overrides, per-token and replica-hour costs, flags."""

from __future__ import annotations

import re

import pytest

from serve_app.settings import ModelConfig, PricingConfig
from serve_app.pricing import PriceTable, load_list_prices, overrides_from_models
from serve_app.protocol.metrics import RequestEvent

LISTED = ["gpt-4o", "gpt-4o-mini", "gpt-4.1-mini", "claude-sonnet-4", "claude-3-5-haiku",
          "gemini-2.0-flash", "gemini-1.5-pro"]


def event(model: str, prompt: int = 0, completion: int = 0, **kw) -> RequestEvent:
    return RequestEvent(event_id=kw.pop("event_id", "e1"), ts=1.0, model=model,
                        route="/v1/chat/completions", prompt_tokens=prompt,
                        completion_tokens=completion, **kw)


def mock_model(model_id: str, **extra) -> ModelConfig:
    return ModelConfig.model_validate({"id": model_id, "engine": {"type": "mock"}, **extra})


def test_packaged_list_prices_are_complete_dated_and_sourced() -> None:
    prices = load_list_prices()
    for model in LISTED:
        price = prices[model]
        assert price.input_usd_per_million > 0 and price.output_usd_per_million > 0, model
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", price.as_of or ""), model
        assert (price.url or "").startswith("https://"), model
        assert price.provider in {"openai", "anthropic", "gemini"}, model
    assert prices["gpt-4o-2024-08-06"] is prices["gpt-4o"]


def test_remote_list_price_to_the_nanodollar() -> None:
    table = PriceTable()
    entry = table.price(event("gpt-4o", prompt=1234, completion=567, provider="openai"))
    # 1234 * 2.50 / 1e6 + 567 * 10.00 / 1e6
    assert entry.cost_usd == pytest.approx(0.003085 + 0.00567, abs=1e-9)
    assert entry.cost_estimated is False
    assert entry.price_source == "table:openai 2025-06-01"
    # Provider-prefixed ids and dated snapshots resolve to the same price.
    assert table.quote("openai/gpt-4o", 1234, 567) == entry.cost_usd
    assert table.quote("gpt-4o-2024-11-20", 1234, 567) == entry.cost_usd


def test_long_context_tier_applies_above_its_threshold_only() -> None:
    table = PriceTable()
    assert table.quote("gemini-1.5-pro", 128_000, 1000) == pytest.approx(
        (128_000 * 1.25 + 1000 * 5.00) / 1e6, abs=1e-12)
    assert table.quote("gemini-1.5-pro", 128_001, 1000) == pytest.approx(
        (128_001 * 2.50 + 1000 * 10.00) / 1e6, abs=1e-12)


def test_same_bits_as_pricing_config_cost_for_the_websocket_complete() -> None:
    config = PricingConfig(input_usd_per_million=0.37, output_usd_per_million=1.13)
    table = PriceTable({"m": config.model_dump()})
    for prompt, completion in [(1, 1), (999_999, 3), (123_457, 98_765)]:
        assert table.quote("m", prompt, completion) == config.cost(prompt, completion)


def test_config_wins_field_by_field_over_the_list_price() -> None:
    table = PriceTable({"gpt-4o": {"output_usd_per_million": 8.0}})
    entry = table.price(event("gpt-4o", prompt=1_000_000, completion=1_000_000))
    assert entry.cost_usd == pytest.approx(2.50 + 8.0, abs=1e-9)  # list input, config output
    assert entry.price_source == "config"


def test_overrides_from_models_keep_list_prices_unless_config_sets_them() -> None:
    models = [
        mock_model("gpt-4o-mini"),                                   # no pricing: list price
        mock_model("local-free"),                                    # no pricing: free
        mock_model("local-paid", pricing={"input_usd_per_million": 0.5,
                                          "output_usd_per_million": 1.5}),
    ]
    overrides = overrides_from_models(models)
    assert overrides == {"gpt-4o-mini": {}, "local-free": {},
                         "local-paid": {"input_usd_per_million": 0.5,
                                        "output_usd_per_million": 1.5}}
    table = PriceTable.from_models(models)
    assert table.quote("gpt-4o-mini", 1_000_000, 0) == pytest.approx(0.15)
    free = table.price(event("local-free", prompt=100, completion=100))
    assert (free.cost_usd, free.cost_estimated, free.price_source) == (0.0, False, "config")
    assert table.quote("local-paid", 2000, 1000) == pytest.approx(0.0025, abs=1e-12)


def test_cancelled_request_is_charged_for_what_was_generated() -> None:
    table = PriceTable({"local": {"input_usd_per_million": 1.0, "output_usd_per_million": 2.0}})
    entry = table.price(event("local", prompt=10, completion=7, finish_reason="cancelled"))
    assert entry.cost_usd == pytest.approx((10 * 1.0 + 7 * 2.0) / 1e6, abs=1e-15)
    assert entry.cost_estimated is False


def test_counted_usage_of_a_cut_remote_stream_is_flagged_estimated() -> None:
    entry = PriceTable().price(event("claude-3-5-haiku", prompt=50, completion=12,
                                     provider="anthropic", usage_estimated=True))
    assert entry.cost_usd == pytest.approx((50 * 0.80 + 12 * 4.00) / 1e6, abs=1e-15)
    assert entry.cost_estimated is True


def test_replica_hour_pricing_by_gpu_hour_and_reported_busy_share() -> None:
    table = PriceTable({"llama": {"gpu_hour_usd": 3.6, "num_gpus": 2}})
    entry = table.price(event("llama", prompt=100, completion=100, replica_busy_s=10.0))
    assert entry.cost_usd == pytest.approx(7.2 / 3600 * 10.0, abs=1e-12)  # 0.02 USD
    assert entry.cost_estimated is False
    assert entry.price_source == "config+replica-hour"


def test_replica_hour_without_busy_share_estimates_from_engine_time() -> None:
    table = PriceTable({"llama": {"replica_hour_usd": 1.8}})
    entry = table.price(event("llama", e2e_ms=2500.0, queue_ms=500.0))
    assert entry.cost_usd == pytest.approx(1.8 / 3600 * 2.0, abs=1e-12)
    assert entry.cost_estimated is True


def test_per_resource_rates_take_replica_resources_from_deployment_config() -> None:
    model = mock_model("gpu-llm", deployment={"ray_actor_options": {"num_gpus": 1, "num_cpus": 4}})
    # PricingConfig has no resource rates yet: emulate what from_models feeds PriceTable.
    overrides = overrides_from_models([model])
    overrides["gpu-llm"].update(gpu_hour_usd=2.0, cpu_hour_usd=0.05, num_gpus=1, num_cpus=4)
    table = PriceTable(overrides)
    assert table.price(event("gpu-llm", replica_busy_s=3600.0)).cost_usd == pytest.approx(2.2)


def test_unknown_model_costs_zero_and_is_flagged() -> None:
    entry = PriceTable().price(event("who-knows", prompt=10, completion=10))
    assert (entry.cost_usd, entry.cost_estimated, entry.price_source) == (0.0, True, "unpriced")


@pytest.mark.parametrize("override, fragment", [
    ({"m": {"input_per_million": 1.0}}, "unknown price override field"),
    ({"m": {"input_usd_per_million": -1}}, "finite and >= 0"),
    ({"m": {"output_usd_per_million": float("nan")}}, "finite and >= 0"),
    ({"m": {"replica_hour_usd": "2"}}, "must be a number"),
])
def test_bad_overrides_fail_with_an_example(override: dict, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        PriceTable(override)
    assert "example" in str(info.value)


def test_negative_tokens_are_refused() -> None:
    with pytest.raises(ValueError, match="token counts"):
        PriceTable().price(event("gpt-4o", prompt=-1))


def test_prices_survive_the_builders_settings_round_trip() -> None:
    """The builder hands settings to replicas as data; unset prices must stay unset.

    A plain ``model_dump`` marks every pricing field as set, so a remote model would be
    "configured" at $0 and lose its list price (a real bug, caught through Serve).
    """
    from serve_app.settings import TroupeSettings, load_settings
    from serve_app.pricing import PriceTable

    settings = load_settings({"models": [
        {"id": "remote-gpt", "engine": {"type": "openai", "model": "gpt-4o-mini"}},
        {"id": "local", "engine": {"type": "mock"}, "pricing": {"output_usd_per_million": 2}},
    ]})
    shipped = TroupeSettings.model_validate(settings.model_dump(mode="json", exclude_unset=True))
    table = PriceTable.from_models(shipped.models)
    assert table.quote("remote-gpt", 1_000_000, 1_000_000) == pytest.approx(0.15 + 0.60)
    assert table.quote("local", 1_000_000, 1_000_000) == pytest.approx(2.0)

"""The price table: what one finished request cost, from list prices and config.

Two sources, merged per model (config wins, field by field):

* ``serve_app/data/prices.yaml``: providers' published list prices for a handful of remote
  models (USD per 1M input/output tokens, with the date and page they were read from).
* Per-model overrides from config (``ModelConfig.pricing``), or any mapping passed to
  :class:`PriceTable`.

A request's cost is the sum of two parts, either of which may be zero:

* tokens (the default): ``(prompt_tokens * input_rate + completion_tokens * output_rate)
  / 1e6`` in plain float math (the prompt tokens a provider served from its prompt cache,
  ``cached_tokens``, at the model's ``cached_input_usd_per_million`` when it has one),
  the same formula as ``PricingConfig.cost`` so the gateway's WebSocket ``complete`` and
  the ledger agree to the last bit. Doubles hold about 15-16 significant digits, so any
  realistic request (< 1e9 tokens at < $1,000 per 1M) is exact far below 1e-9 USD;
* replica time (optional, local models): ``replica_hour_usd / 3600 * replica_busy_s``,
  where ``replica_hour_usd`` is given, or built from per-resource rates
  (``gpu_hour_usd * num_gpus + cpu_hour_usd * num_cpus``). When the replica did not
  report its busy share, the request's own engine time (end-to-end minus queue wait)
  stands in for it and the entry is flagged estimated; that is an upper bound when the
  replica batched several requests at once.

Cancelled requests are priced like any other: the event carries the tokens generated
before the cancel. An event whose usage was counted rather than reported
(``usage_estimated``, e.g. a remote stream cut before its usage chunk) and a model with
no known price (cost 0) both yield ``cost_estimated=True``.

Imports neither Ray nor torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, Iterable, Mapping, Optional

import yaml

from serve_app.protocol.metrics import LedgerEntry, RequestEvent

__all__ = ["ModelPrice", "PriceTable", "load_list_prices", "overrides_from_models", "OVERRIDE_FIELDS"]

OVERRIDE_FIELDS = (
    "input_usd_per_million",
    "cached_input_usd_per_million",
    "output_usd_per_million",
    "replica_hour_usd",
    "gpu_hour_usd",
    "cpu_hour_usd",
    "num_gpus",
    "num_cpus",
)
"""Keys a per-model override mapping may hold (all non-negative numbers)."""

_OVERRIDE_EXAMPLE = (
    "{'my-model': {'input_usd_per_million': 0.5, 'output_usd_per_million': 1.5}} or "
    "{'local-llm': {'gpu_hour_usd': 2.0, 'num_gpus': 1}}"
)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """The price of one model. Rates are USD per 1M tokens, or USD per replica-hour."""

    model: str
    provider: Optional[str] = None
    input_usd_per_million: float = 0.0
    output_usd_per_million: float = 0.0
    long_prompt_tokens_over: Optional[int] = None  # above this, the long_* rates apply
    long_input_usd_per_million: float = 0.0
    long_output_usd_per_million: float = 0.0
    #: Prompt tokens served from the provider's prompt cache (None: the input rate).
    cached_input_usd_per_million: Optional[float] = None
    replica_hour_usd: Optional[float] = None
    as_of: Optional[str] = None
    url: Optional[str] = None
    origin: str = "table"  # "table" (list price) or "config" (an override touched it)

    @property
    def source(self) -> str:
        """What the ledger's ``price_source`` says, e.g. ``table:openai 2025-06-01``."""
        if self.origin == "config":
            return "config"
        return f"table:{self.provider or 'unknown'} {self.as_of or 'undated'}"

    def token_cost(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> float:
        """USD for the tokens alone (long-context rates when the prompt is over the limit;
        ``cached_tokens`` of the prompt at the cached-input rate, when there is one)."""
        if self.long_prompt_tokens_over is not None and prompt_tokens > self.long_prompt_tokens_over:
            rate_in, rate_out = self.long_input_usd_per_million, self.long_output_usd_per_million
        else:
            rate_in, rate_out = self.input_usd_per_million, self.output_usd_per_million
        cached = min(max(cached_tokens, 0), prompt_tokens)
        if not cached or self.cached_input_usd_per_million is None:
            return (prompt_tokens * rate_in + completion_tokens * rate_out) / 1_000_000
        return ((prompt_tokens - cached) * rate_in + cached * self.cached_input_usd_per_million
                + completion_tokens * rate_out) / 1_000_000


def _number(model: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(
            f"price override {model}.{key} must be a number, got {value!r}; "
            f"example: {_OVERRIDE_EXAMPLE}"
        )
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"price override {model}.{key} must be finite and >= 0, got {value!r}; "
            f"example: {_OVERRIDE_EXAMPLE}"
        )
    return float(value)


def _parse_entry(model: str, raw: Mapping[str, Any]) -> ModelPrice:
    long = raw.get("long_context") or {}
    return ModelPrice(
        model=model,
        provider=raw.get("provider"),
        input_usd_per_million=float(raw.get("input_usd_per_million", 0.0)),
        output_usd_per_million=float(raw.get("output_usd_per_million", 0.0)),
        long_prompt_tokens_over=(
            int(long["prompt_tokens_over"]) if "prompt_tokens_over" in long else None
        ),
        long_input_usd_per_million=float(long.get("input_usd_per_million", 0.0)),
        long_output_usd_per_million=float(long.get("output_usd_per_million", 0.0)),
        cached_input_usd_per_million=(
            float(raw["cached_input_usd_per_million"])
            if raw.get("cached_input_usd_per_million") is not None else None
        ),
        as_of=str(raw["as_of"]) if raw.get("as_of") is not None else None,
        url=raw.get("source"),
    )


def load_list_prices(text: Optional[str] = None) -> dict[str, ModelPrice]:
    """Parse the packaged ``prices.yaml`` (or ``text``): model id and aliases -> price."""
    if text is None:
        text = resources.files("serve_app").joinpath("data/prices.yaml").read_text("utf-8")
    data = yaml.safe_load(text) or {}
    prices: dict[str, ModelPrice] = {}
    for model, raw in (data.get("models") or {}).items():
        price = _parse_entry(model, raw)
        prices[model] = price
        for alias in raw.get("aliases") or ():
            prices[alias] = price
    return prices


def _apply_override(model: str, base: Optional[ModelPrice], raw: Mapping[str, Any]) -> ModelPrice:
    """Merge one override mapping over ``base`` (or over a free local model)."""
    unknown = sorted(set(raw) - set(OVERRIDE_FIELDS))
    if unknown:
        raise ValueError(
            f"unknown price override field(s) for {model!r}: {unknown}; allowed: "
            f"{list(OVERRIDE_FIELDS)}; example: {_OVERRIDE_EXAMPLE}"
        )
    values = {key: _number(model, key, value) for key, value in raw.items() if value is not None}
    if base is not None and not values:
        return base  # a configured model that sets no price keeps its list price
    price = base if base is not None else ModelPrice(model=model, provider=None)
    changes: dict[str, Any] = {"origin": "config"}
    for key in ("input_usd_per_million", "output_usd_per_million"):
        if key in values:
            changes[key] = values[key]
            # An explicit token rate replaces the list price's long-context tier too.
            changes["long_prompt_tokens_over"] = None
    if "cached_input_usd_per_million" in values:
        changes["cached_input_usd_per_million"] = values["cached_input_usd_per_million"]
    if "replica_hour_usd" in values:
        changes["replica_hour_usd"] = values["replica_hour_usd"]
    elif "gpu_hour_usd" in values or "cpu_hour_usd" in values:
        changes["replica_hour_usd"] = values.get("gpu_hour_usd", 0.0) * values.get(
            "num_gpus", 0.0
        ) + values.get("cpu_hour_usd", 0.0) * values.get("num_cpus", 0.0)
    return replace(price, **changes)


def overrides_from_models(models: Iterable[Any]) -> dict[str, dict[str, Any]]:
    """The override mapping for configured models (``ModelConfig``), for the metrics actor.

    Every configured model gets an entry, holding only the ``pricing`` fields the config
    set explicitly: an empty entry keeps the model's list price, or makes a model with no
    list price (a local one) free rather than "unpriced". Per-resource rates take the
    replica's resources from ``deployment.ray_actor_options``. The result is plain data
    (picklable), so the builder can pass it to the actor's constructor.
    """
    overrides: dict[str, dict[str, Any]] = {}
    for model in models:
        fields = model.pricing.model_dump(exclude_unset=True)
        if "gpu_hour_usd" in fields or "cpu_hour_usd" in fields:
            actor = model.deployment.ray_actor_options
            fields.setdefault("num_gpus", actor.num_gpus)
            fields.setdefault("num_cpus", actor.num_cpus)
        if model.provider != "local":
            # A remote model starts from the list price of the upstream model it calls.
            fields["list_price_of"] = model.engine.model
            if getattr(model.engine, "flex_tier", False):
                fields["flex_discount"] = model.engine.flex_discount
        overrides[model.id] = fields
    return overrides


class PriceTable:
    """Prices requests: list prices for known remote models, merged with overrides.

    Args:
        overrides: model id -> mapping of :data:`OVERRIDE_FIELDS` (see
            :func:`overrides_from_models`); config wins over the list price field by
            field, and an empty mapping marks a configured model (free unless listed).
            Raises ``ValueError`` on an unknown field or a negative / non-finite number.
        list_prices: replaces the packaged list prices (tests).
    """

    def __init__(
        self,
        overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
        *,
        list_prices: Optional[Mapping[str, ModelPrice]] = None,
    ) -> None:
        self._prices: dict[str, ModelPrice] = dict(
            load_list_prices() if list_prices is None else list_prices
        )
        listed = dict(self._prices)
        #: model -> fraction of the price saved when the flex tier served (start_within).
        self._flex_discount: dict[str, float] = {}
        for model, raw in (overrides or {}).items():
            raw = dict(raw)
            flex = raw.pop("flex_discount", None)
            if flex is not None:
                self._flex_discount[model] = min(1.0, _number(model, "flex_discount", flex))
            base_name = raw.pop("list_price_of", None) or model
            base = listed.get(base_name) or listed.get(model)
            self._prices[model] = _apply_override(model, base, raw)

    @classmethod
    def from_models(cls, models: Iterable[Any], **kwargs: Any) -> "PriceTable":
        """Build from ``ModelConfig`` objects (see :func:`overrides_from_models`)."""
        return cls(overrides_from_models(models), **kwargs)

    def lookup(self, model: str) -> Optional[ModelPrice]:
        """The price of ``model`` (an id, alias, or ``provider/id``), or None if unknown."""
        price = self._prices.get(model)
        if price is None and "/" in model:
            price = self._prices.get(model.rsplit("/", 1)[1])
        if price is None and ":" in model:  # a LoRA adapter "<base>:<adapter>" costs its base
            price = self._prices.get(model.rsplit(":", 1)[0])
        return price

    def quote(self, model: str, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for the tokens of one request (the WebSocket ``complete`` message)."""
        price = self.lookup(model)
        return 0.0 if price is None else price.token_cost(prompt_tokens, completion_tokens)

    def price(self, event: RequestEvent) -> LedgerEntry:
        """Price one finished request.

        Raises:
            ValueError: negative token counts or a negative/non-finite busy time.
        """
        if event.prompt_tokens < 0 or event.completion_tokens < 0:
            raise ValueError(
                f"event {event.event_id}: token counts must be >= 0 "
                f"(prompt={event.prompt_tokens}, completion={event.completion_tokens})"
            )
        price = self.lookup(event.model)
        if price is None:
            return LedgerEntry(event=event, cost_usd=0.0, cost_estimated=True,
                               price_source="unpriced")
        cost = price.token_cost(event.prompt_tokens, event.completion_tokens, event.cached_tokens)
        estimated = event.usage_estimated
        source = price.source
        if event.tier == "flex" and event.model in self._flex_discount:
            # Served by the provider's flex tier: the list price minus its discount.
            discount = self._flex_discount[event.model]
            cost *= 1.0 - discount
            source += f"+flex-{round(discount * 100)}%"
        if price.replica_hour_usd is not None:
            busy_s = event.replica_busy_s
            if busy_s is None:
                busy_s = max(0.0, event.e2e_ms - (event.queue_ms or 0.0)) / 1000.0
                estimated = True
            elif not math.isfinite(busy_s) or busy_s < 0:
                raise ValueError(f"event {event.event_id}: replica_busy_s must be >= 0")
            cost += price.replica_hour_usd / 3600 * busy_s
            source += "+replica-hour"
        return LedgerEntry(event=event, cost_usd=cost, cost_estimated=estimated,
                           price_source=source)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Every price, for ``GET /models`` or debugging (aliases included)."""
        return {
            model: {
                "provider": p.provider,
                "input_usd_per_million": p.input_usd_per_million,
                "output_usd_per_million": p.output_usd_per_million,
                "cached_input_usd_per_million": p.cached_input_usd_per_million,
                "replica_hour_usd": p.replica_hour_usd,
                "source": p.source,
                "as_of": p.as_of,
                "url": p.url,
            }
            for model, p in sorted(self._prices.items())
        }

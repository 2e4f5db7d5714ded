"""The in-memory mirror of the ledger: totals per label set and latency histograms, and
their Prometheus families (counters and histograms, ``troupe_*``)."""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Iterator, Mapping, Optional, Sequence, TypeGuard, Union

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from serve_app.protocol.metrics import LedgerEntry, RequestEvent

__all__ = ["DEFAULT_BUCKETS_MS", "Buckets", "Histogram", "Aggregates", "ledger_families",
           "resolve_buckets", "finite_ms", "is_error"]

DEFAULT_BUCKETS_MS: dict[str, tuple[float, ...]] = {
    "queue_wait": (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000),
    "ttft": (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000),
    "inter_token": (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
    "e2e": (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000),
    "cold_start_ttft": (100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000,
                        600000),
    "adapter_load": (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000),
    "realtime_ttfa": (100, 250, 500, 750, 1000, 1500, 2000, 3000, 5000, 10000, 30000),
}
"""Histogram bucket upper bounds in milliseconds (exposed in seconds)."""

_HISTOGRAM_HELP = {
    "queue_wait": "Time a request waited before a replica started it.",
    "ttft": "Time to first token (client-visible, at the gateway).",
    "inter_token": "Gap between streamed tokens, one observation per token.",
    "e2e": "End-to-end request latency at the gateway.",
    "cold_start_ttft": "Time to first token of requests that waited for their replica to "
                       "start (scale from zero).",
    "adapter_load": "Time a request waited for its LoRA adapter to load on the replica "
                    "(model label: <base>:<adapter>).",
    "realtime_ttfa": "Time from the end of the user's speech to the first audio of the answer "
                     "(/v1/realtime responses; model label: the text model).",
}

_BASE = ("model", "provider", "route", "key_id", "tier")
_HIST_LABELS = ("model", "route", "tier")

Buckets = Union[Sequence[float], Mapping[str, Sequence[float]], None]


class Histogram:
    """Non-cumulative bucket counts; cumulated when exposed."""

    __slots__ = ("bounds", "counts", "sum_ms")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum_ms = 0.0

    def observe(self, value_ms: float) -> None:
        # bisect_left: the first bound >= value, i.e. Prometheus's "le".
        self.counts[bisect_left(self.bounds, value_ms)] += 1
        self.sum_ms += value_ms

    def buckets(self) -> list[tuple[str, int]]:
        out, running = [], 0
        for bound, count in zip(self.bounds, self.counts):
            running += count
            out.append((repr(bound / 1000.0), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def finite_ms(value: Optional[float]) -> TypeGuard[float]:
    return value is not None and value >= 0 and math.isfinite(value)


class Aggregates:
    """Everything the ledger implies, in memory: totals rows and histograms."""

    def __init__(self, bounds: Mapping[str, tuple[float, ...]]) -> None:
        self.bounds = bounds
        # (model, provider, route, key_id, tier, status, error_code) ->
        # [requests, prompt_tokens, completion_tokens, cost_usd, estimated]
        self.totals: dict[tuple, list] = {}
        self.histograms: dict[str, dict[tuple[str, str, str], Histogram]] = {
            metric: {} for metric in bounds
        }

    def add_totals(self, key: tuple, requests: int, prompt: int, completion: int,
                   cost: float, estimated: int) -> None:
        row = self.totals.get(key)
        if row is None:
            row = self.totals[key] = [0, 0, 0, 0.0, 0]
        row[0] += requests
        row[1] += prompt
        row[2] += completion
        row[3] += cost
        row[4] += estimated

    def add_entry(self, entry: LedgerEntry) -> None:
        ev = entry.event
        self.add_totals(
            (ev.model, ev.provider, ev.route, ev.key_id, ev.tier, ev.status, ev.error_code),
            1, ev.prompt_tokens, ev.completion_tokens, entry.cost_usd, int(entry.cost_estimated),
        )
        self.observe(ev)

    def _histogram(self, metric: str, key: tuple[str, str, str]) -> Histogram:
        hist = self.histograms[metric].get(key)
        if hist is None:
            hist = self.histograms[metric][key] = Histogram(self.bounds[metric])
        return hist

    def observe(self, ev: RequestEvent) -> None:
        key = (ev.model, ev.route, ev.tier)
        if finite_ms(ev.queue_ms):
            self._histogram("queue_wait", key).observe(ev.queue_ms)
        if finite_ms(ev.ttft_ms):
            self._histogram("ttft", key).observe(ev.ttft_ms)
            if ev.cold_start:
                self._histogram("cold_start_ttft", key).observe(ev.ttft_ms)
        if finite_ms(ev.adapter_load_ms):
            self._histogram("adapter_load", key).observe(ev.adapter_load_ms)
        if finite_ms(ev.e2e_ms):
            self._histogram("e2e", key).observe(ev.e2e_ms)
        if finite_ms(ev.ttfa_ms):
            self._histogram("realtime_ttfa", key).observe(ev.ttfa_ms)
        if ev.inter_token_ms:
            hist = self._histogram("inter_token", key)
            for gap in ev.inter_token_ms:
                if finite_ms(gap):
                    hist.observe(gap)


def is_error(status: int, error_code: Optional[str]) -> bool:
    return error_code is not None or status >= 400


def ledger_families(agg: Aggregates) -> Iterator[Metric]:
    """Counters and histograms over the in-memory ledger aggregates."""
    requests = CounterMetricFamily(
        "troupe_requests", "Finished requests.", labels=[*_BASE, "status"])
    errors = CounterMetricFamily(
        "troupe_errors", "Failed requests by Troupe error code.", labels=[*_BASE, "code"])
    tokens = CounterMetricFamily(
        "troupe_tokens", "Tokens by kind (prompt or completion).", labels=[*_BASE, "kind"])
    cost = CounterMetricFamily(
        "troupe_cost_usd", "Cost in USD from the price table.", labels=list(_BASE))
    estimated = CounterMetricFamily(
        "troupe_cost_estimated_requests",
        "Requests whose cost was estimated (counted usage, unknown busy time or price).",
        labels=list(_BASE))
    by_status: dict[tuple, int] = {}
    by_code: dict[tuple, int] = {}
    by_base: dict[tuple, list] = {}
    for (*base_list, status, code), row in agg.totals.items():
        base = tuple(str(v) for v in base_list)
        skey = (*base, str(status))
        by_status[skey] = by_status.get(skey, 0) + row[0]
        if is_error(status, code):
            ckey = (*base, code or f"HTTP_{status}")
            by_code[ckey] = by_code.get(ckey, 0) + row[0]
        acc = by_base.setdefault(base, [0, 0, 0.0, 0])
        acc[0] += row[1]
        acc[1] += row[2]
        acc[2] += row[3]
        acc[3] += row[4]
    for labels, value in sorted(by_status.items()):
        requests.add_metric(labels, value)
    for labels, value in sorted(by_code.items()):
        errors.add_metric(labels, value)
    for base, (prompt, completion, usd, est) in sorted(by_base.items()):
        tokens.add_metric([*base, "prompt"], prompt)
        tokens.add_metric([*base, "completion"], completion)
        # Rounded to 1e-9 USD: a rebuilt sum and a running sum then print the same.
        cost.add_metric(base, round(usd, 9))
        estimated.add_metric(base, est)
    yield from (requests, errors, tokens, cost, estimated)
    for metric, series in agg.histograms.items():
        family = HistogramMetricFamily(
            f"troupe_{metric}_seconds", _HISTOGRAM_HELP[metric], labels=list(_HIST_LABELS))
        for labels, hist in sorted(series.items(), key=lambda item: tuple(map(str, item[0]))):
            family.add_metric([str(v) for v in labels], hist.buckets(), round(hist.sum_ms / 1000.0, 9))
        yield family


def resolve_buckets(buckets: Buckets) -> dict[str, tuple[float, ...]]:
    if buckets is None:
        chosen: Mapping[str, Sequence[float]] = DEFAULT_BUCKETS_MS
    elif isinstance(buckets, Mapping):
        unknown = set(buckets) - set(DEFAULT_BUCKETS_MS)
        if unknown:
            raise ValueError(f"unknown histogram(s) {sorted(unknown)}; "
                             f"known: {sorted(DEFAULT_BUCKETS_MS)}")
        chosen = {**DEFAULT_BUCKETS_MS, **buckets}
    else:
        chosen = {metric: buckets for metric in DEFAULT_BUCKETS_MS}
    out = {}
    for metric, bounds in chosen.items():
        values = tuple(float(b) for b in bounds)
        if not values or any(not math.isfinite(b) or b <= 0 for b in values) or list(
                values) != sorted(set(values)):
            raise ValueError(f"buckets for {metric!r} must be increasing positive numbers (ms), "
                             f"e.g. [5, 10, 50, 100], got {list(bounds)}")
        out[metric] = values
    return out

"""MetricsActor: the cost ledger, latency histograms and Prometheus text of the gateway.

A plain async class (no Ray here): the app builder applies ``ray.remote`` with
``name="troupe-metrics"``, ``namespace="troupe"``, ``lifetime="detached"``,
``max_restarts=-1``, ``max_task_retries=-1``, ``get_if_exists=True``. Gateway replicas
never call it on the request path: a per-process :class:`actors.recorder.MetricsRecorder`
buffers :class:`RequestEvent` s and flushes them here in batches.

What it keeps:

* the ledger, in the store: every event priced by :class:`serve_app.pricing.PriceTable`
  and appended once (``event_id`` makes appends idempotent);
* in-memory aggregates that mirror the ledger (requests, errors, tokens, cost per
  model/provider/route/key/tier/status) and latency histograms (queue wait, TTFT,
  inter-token, end-to-end per model/route/tier). Only rows the store reports as new
  update them, so a retried batch never counts twice. At start both are rebuilt from the
  store (totals from ``ledger_totals``, histograms from the whole ledger), so a killed
  and restarted actor serves the same counters it had;
* gauges (in-flight requests per deployment) and custom metrics, in memory only: gauges
  are re-sent by the recorders, custom metrics restart from empty (Prometheus treats a
  counter that restarts as a reset).

Rebuilding reads the whole ledger once at start: fine for millions of rows; a much
larger ledger wants persisted histogram snapshots (a store change).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from bisect import bisect_left
from collections import OrderedDict
from typing import Any, Iterator, Mapping, Optional, Sequence, Union
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from actors.names import METRICS_ACTOR, NAMESPACE
from actors.traces import TraceBuffer
from serve_app.errors import InvalidRequest
from serve_app.pricing import PriceTable
from serve_app.protocol.metrics import LedgerEntry, RequestEvent
from serve_app.store.base import Store, open_store

__all__ = [
    "MetricsActor",
    "ACTOR_NAME",
    "ACTOR_NAMESPACE",
    "DEFAULT_BUCKETS_MS",
    "BUILTIN_GAUGES",
    "USAGE_GROUPS",
]

logger = logging.getLogger("troupe.metrics")

ACTOR_NAME = METRICS_ACTOR
ACTOR_NAMESPACE = NAMESPACE

DEFAULT_BUCKETS_MS: dict[str, tuple[float, ...]] = {
    "queue_wait": (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000),
    "ttft": (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000),
    "inter_token": (1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500),
    "e2e": (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000),
    "cold_start_ttft": (100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000, 120000, 300000,
                        600000),
    "adapter_load": (10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000),
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
}

BUILTIN_GAUGES: dict[str, tuple[tuple[str, ...], str]] = {
    "in_flight_requests": (("deployment",), "Requests in flight per deployment (all gateway replicas)."),
    "replicas": (("application", "deployment", "state"),
                 "Serve replicas per deployment and state (polled from serve.status())."),
}
"""Gauges :meth:`MetricsActor.set_gauge` accepts: name -> (label names, help)."""

USAGE_GROUPS = {"model": "model", "provider": "provider", "key": "key_id", "key_id": "key_id",
                "tier": "tier", "route": "route"}
"""``group_by`` values of :meth:`MetricsActor.usage` -> RequestEvent field."""

_BASE = ("model", "provider", "route", "key_id", "tier")
_HIST_LABELS = ("model", "route", "tier")
_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MAX_NAME_CHARS = 100
MAX_LABELS = 8
MAX_LABEL_SETS = 1000
MAX_LABEL_VALUE_CHARS = 256
MAX_CUSTOM_METRICS = 200
GAUGE_TTL_S = 60.0
_CUSTOM_EXAMPLE = (
    '{"name": "queue_depth", "kind": "gauge", "value": 3, "labels": {"region": "eu"}}'
)

Buckets = Union[Sequence[float], Mapping[str, Sequence[float]], None]


# --------------------------------------------------------------------------- aggregates


class _Histogram:
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


def _finite_ms(value: Optional[float]) -> bool:
    return value is not None and value >= 0 and math.isfinite(value)


class _Aggregates:
    """Everything the ledger implies, in memory: totals rows and histograms."""

    def __init__(self, bounds: Mapping[str, tuple[float, ...]]) -> None:
        self.bounds = bounds
        # (model, provider, route, key_id, tier, status, error_code) ->
        # [requests, prompt_tokens, completion_tokens, cost_usd, estimated]
        self.totals: dict[tuple, list] = {}
        self.histograms: dict[str, dict[tuple[str, str, str], _Histogram]] = {
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

    def _histogram(self, metric: str, key: tuple[str, str, str]) -> _Histogram:
        hist = self.histograms[metric].get(key)
        if hist is None:
            hist = self.histograms[metric][key] = _Histogram(self.bounds[metric])
        return hist

    def observe(self, ev: RequestEvent) -> None:
        key = (ev.model, ev.route, ev.tier)
        if _finite_ms(ev.queue_ms):
            self._histogram("queue_wait", key).observe(ev.queue_ms)
        if _finite_ms(ev.ttft_ms):
            self._histogram("ttft", key).observe(ev.ttft_ms)
            if ev.cold_start:
                self._histogram("cold_start_ttft", key).observe(ev.ttft_ms)
        if _finite_ms(ev.adapter_load_ms):
            self._histogram("adapter_load", key).observe(ev.adapter_load_ms)
        if _finite_ms(ev.e2e_ms):
            self._histogram("e2e", key).observe(ev.e2e_ms)
        if ev.inter_token_ms:
            hist = self._histogram("inter_token", key)
            for gap in ev.inter_token_ms:
                if _finite_ms(gap):
                    hist.observe(gap)


def _is_error(status: int, error_code: Optional[str]) -> bool:
    return error_code is not None or status >= 400


def _ledger_families(agg: _Aggregates) -> Iterator[Metric]:
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
        if _is_error(status, code):
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


# --------------------------------------------------------------------------- custom metrics


def _invalid(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"{message}. Example of a valid body: {_CUSTOM_EXAMPLE}", param=param)


def _check_labels(labels: Mapping[str, Any]) -> None:
    if not isinstance(labels, Mapping):
        raise _invalid(f"labels must be an object of name -> string, got {type(labels).__name__}",
                       "labels")
    if len(labels) > MAX_LABELS:
        raise _invalid(f"{len(labels)} labels given; at most {MAX_LABELS} are allowed", "labels")
    for label, value in labels.items():
        if not isinstance(label, str) or not _LABEL_RE.match(label) or label.startswith("__"):
            raise _invalid(
                f"label name {label!r} is not valid: use letters, digits and '_', not starting "
                "with a digit or '__'", "labels")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE_CHARS:
            raise _invalid(
                f"label {label!r} must have a string value of at most {MAX_LABEL_VALUE_CHARS} "
                f"characters, got {value!r:.80}", "labels")


def _check_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(f"value must be a finite number, got {value!r}", "value")
    return float(value)


class _LabelledValues:
    """Values per label set, with a fixed label schema and a cardinality bound."""

    __slots__ = ("kind", "label_names", "values", "help")

    def __init__(self, kind: str, label_names: tuple[str, ...], help_text: str) -> None:
        self.kind = kind
        self.label_names = label_names
        self.values: dict[tuple[str, ...], Any] = {}
        self.help = help_text

    def slot(self, name: str, labels: Mapping[str, str]) -> tuple[str, ...]:
        if tuple(sorted(labels)) != tuple(sorted(self.label_names)):
            raise _invalid(
                f"metric {name!r} has labels {list(self.label_names)}; every update must "
                f"send exactly those, got {sorted(labels)}", "labels")
        key = tuple(labels[n] for n in self.label_names)
        if key not in self.values and len(self.values) >= MAX_LABEL_SETS:
            raise _invalid(
                f"metric {name!r} already has {MAX_LABEL_SETS} label sets (the cardinality "
                "bound); reuse existing label values instead of ids or timestamps", "labels")
        return key


class _CustomMetrics:
    """Named gauges and counters posted to ``POST /metrics/custom``."""

    PREFIX = "troupe_custom_"

    def __init__(self) -> None:
        self.metrics: dict[str, _LabelledValues] = {}

    def record(self, name: Any, kind: Any, value: Any, labels: Mapping[str, Any]) -> None:
        if kind not in ("gauge", "counter"):
            raise _invalid(f"kind must be 'gauge' or 'counter', got {kind!r}", "kind")
        if (not isinstance(name, str) or len(name) > MAX_NAME_CHARS
                or not _NAME_RE.match(name)):
            raise _invalid(
                f"metric name {name!r:.120} is not valid: use letters, digits, '_' and ':', "
                f"not starting with a digit, at most {MAX_NAME_CHARS} characters", "name")
        number = _check_value(value)
        _check_labels(labels)
        base = name
        if kind == "counter":
            if number < 0:
                raise _invalid(f"a counter only goes up: value must be >= 0, got {value!r}",
                               "value")
            base = name.removesuffix("_total")
            if not base:
                raise _invalid("counter name '_total' has nothing before the suffix", "name")
        elif name.endswith("_total"):
            raise _invalid(f"gauge name {name!r} may not end in '_total' (that suffix marks "
                           "counters)", "name")
        metric = self.metrics.get(base)
        if metric is None:
            if len(self.metrics) >= MAX_CUSTOM_METRICS:
                raise _invalid(f"there are already {MAX_CUSTOM_METRICS} custom metrics; "
                               "update an existing one", "name")
            metric = _LabelledValues(kind, tuple(sorted(labels)), f"Custom {kind} {base}.")
        elif metric.kind != kind:
            raise _invalid(f"metric {name!r} is a {metric.kind}, not a {kind}", "kind")
        key = metric.slot(name, labels)
        self.metrics[base] = metric
        if kind == "counter":
            metric.values[key] = metric.values.get(key, 0.0) + number
        else:
            metric.values[key] = number

    def families(self) -> Iterator[Metric]:
        for base, metric in sorted(self.metrics.items()):
            cls = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
            family = cls(self.PREFIX + base, metric.help, labels=list(metric.label_names))
            for labels, value in sorted(metric.values.items()):
                family.add_metric(list(labels), value)
            yield family


class _Gauges:
    """Built-in gauges reported by many sources (gateway replicas), summed when exposed."""

    def __init__(self, ttl_s: float = GAUGE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self.metrics = {name: _LabelledValues("gauge", labels, help_text)
                        for name, (labels, help_text) in BUILTIN_GAUGES.items()}

    def set(self, name: str, labels: Mapping[str, Any], value: Any, source: str) -> None:
        metric = self.metrics.get(name)
        if metric is None:
            raise InvalidRequest(
                f"unknown gauge {name!r}; built-in gauges are {sorted(self.metrics)} "
                "(post other metrics to /metrics/custom)", param="name")
        number = _check_value(value)
        _check_labels(labels)
        key = metric.slot(name, labels)
        metric.values.setdefault(key, {})[source] = (number, time.monotonic())

    def families(self) -> Iterator[Metric]:
        horizon = time.monotonic() - self.ttl_s
        for name, metric in sorted(self.metrics.items()):
            family = GaugeMetricFamily(f"troupe_{name}", metric.help,
                                       labels=list(metric.label_names))
            for labels, by_source in sorted(metric.values.items()):
                # A source that went quiet (a replica that died) stops counting.
                for source in [s for s, (_, ts) in by_source.items() if ts < horizon]:
                    del by_source[source]
                family.add_metric(list(labels), sum(v for v, _ in by_source.values()))
            yield family


class _Collector:
    """prometheus_client collector over the actor's in-memory state."""

    def __init__(self, actor: "MetricsActor") -> None:
        self.actor = actor

    def collect(self) -> Iterator[Metric]:
        yield from _ledger_families(self.actor._agg)
        yield from self.actor._gauges.families()
        yield from self.actor._custom.families()


# --------------------------------------------------------------------------- the actor


def _resolve_buckets(buckets: Buckets) -> dict[str, tuple[float, ...]]:
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


def _percentiles(values: list[float]) -> dict[str, Optional[float]]:
    """Nearest-rank p50/p90/p99 (always an observed value), plus the sample count."""
    values.sort()
    n = len(values)

    def rank(p: float) -> Optional[float]:
        return values[max(0, math.ceil(p / 100.0 * n) - 1)] if n else None

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "count": n}


def _redact(url: str) -> str:
    """The store URL without a password (health output is not secret)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _check_event(event: RequestEvent) -> None:
    """Refuse what the store cannot hold, so one bad event cannot block its batch forever."""
    for field in ("e2e_ms", "ttft_ms", "queue_ms", "ts"):
        value = getattr(event, field)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"event {event.event_id}: {field} is not finite ({value!r})")
    if not all(math.isfinite(gap) for gap in event.inter_token_ms):
        raise ValueError(f"event {event.event_id}: inter_token_ms holds a non-finite gap")


class MetricsActor:
    """Prices and records finished requests; serves Prometheus text and usage summaries.

    Args:
        store_url: where the ledger lives (``sqlite:///abs/path`` or ``postgresql://``).
        price_overrides: model id -> price override fields
            (:func:`serve_app.pricing.overrides_from_models` builds it from config).
        histogram_buckets_ms: bucket bounds in ms, for every histogram or per histogram
            (keys of :data:`DEFAULT_BUCKETS_MS`).
        store: an already built store (tests); replaces ``store_url``.
        seen_ids: how many recent event ids to remember, so a retried batch is recognised
            without asking the store which rows were new.
    """

    def __init__(
        self,
        store_url: str,
        price_overrides: Optional[Mapping[str, Mapping[str, Any]]] = None,
        histogram_buckets_ms: Buckets = None,
        *,
        store: Optional[Store] = None,
        seen_ids: int = 200_000,
        max_traces: int = 200,
        max_spans_per_trace: int = 64,
        serve_poll_s: float = 0.0,
    ) -> None:
        self._store_url = store_url
        self._store: Store = store if store is not None else open_store(store_url)
        self._prices = PriceTable(price_overrides)
        self._bounds = _resolve_buckets(histogram_buckets_ms)
        self._agg = _Aggregates(self._bounds)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_cap = seen_ids
        self._gauges = _Gauges()
        self._custom = _CustomMetrics()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self))
        self._start_lock = asyncio.Lock()
        self._record_lock = asyncio.Lock()
        self._started = False
        self._started_at: Optional[float] = None
        self._rebuild_s = 0.0
        self._counts = {"recorded": 0, "duplicates": 0, "rejected": 0, "resyncs": 0}
        self._traces = TraceBuffer(max_traces, max_spans_per_trace)
        self._serve_poll_s = serve_poll_s  # 0: do not poll Serve (plain-class tests)
        self._serve_poller: Optional[asyncio.Task] = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open the store and rebuild the aggregates from the ledger (idempotent)."""
        if self._started:
            return
        async with self._start_lock:
            if self._started:
                return
            await self._store.open()
            await self._rebuild()
            self._started = True
            self._started_at = time.time()
            if self._serve_poll_s and self._serve_poller is None:
                self._serve_poller = asyncio.get_running_loop().create_task(self._poll_serve())

    async def _poll_serve(self) -> None:
        """Replicas per deployment and state, from Serve's controller, every few seconds."""
        from ray import serve

        while True:
            try:
                status = await asyncio.to_thread(serve.status)
                for app_name, app in status.applications.items():
                    for dep_name, dep in app.deployments.items():
                        counts = dep.replica_states or {}
                        for state, count in counts.items():
                            labels = {"application": app_name, "deployment": dep_name,
                                      "state": str(getattr(state, "value", state))}
                            self._gauges.set("replicas", labels, count, "serve")
            except Exception:  # Serve not up yet, or shutting down: try again later
                logger.debug("serve.status() failed", exc_info=True)
            await asyncio.sleep(self._serve_poll_s)

    async def close(self) -> None:
        """Release the store's connections."""
        if self._started:
            self._started = False
            await self._store.close()

    async def _rebuild(self) -> None:
        began = time.perf_counter()
        agg = _Aggregates(self._bounds)
        for row in await self._store.ledger_totals():
            key = (row.model, row.provider, row.route, row.key_id, row.tier, row.status,
                   row.error_code)
            agg.add_totals(key, row.requests, row.prompt_tokens, row.completion_tokens,
                           row.cost_usd, row.estimated)
        seen: OrderedDict[str, None] = OrderedDict()
        for entry in await self._store.ledger_window(0.0, math.inf):
            agg.observe(entry.event)
            seen[entry.event.event_id] = None
            if len(seen) > self._seen_cap:
                seen.popitem(last=False)
        self._agg, self._seen = agg, seen
        self._rebuild_s = time.perf_counter() - began
        logger.info("metrics aggregates rebuilt from the ledger in %.3f s (%d series)",
                    self._rebuild_s, len(agg.totals))

    # ------------------------------------------------------------------ recording

    def record_spans(self, spans: list[dict[str, Any]]) -> None:
        """Keep finished spans (a batch from one replica's exporter) for GET /traces."""
        self._traces.add(spans)

    def traces(self, n: int = 20) -> list[dict[str, Any]]:
        """The ``n`` most recent traces, newest first (see ``TraceBuffer.recent``)."""
        return self._traces.recent(n)

    async def record(self, events: Sequence[RequestEvent]) -> int:
        """Price events and append them to the ledger, once per ``event_id``.

        Events already recorded (a retried batch) are skipped; an event that cannot be
        priced (negative tokens, non-finite latency) is logged and dropped rather than
        failing the batch forever. Store errors propagate, so the recorder retries.

        Returns:
            How many events were new (recorded now).
        """
        await self.start()
        async with self._record_lock:
            entries: list[LedgerEntry] = []
            batch_ids: set[str] = set()
            for event in events:
                event_id = event.event_id
                if event_id in self._seen or event_id in batch_ids:
                    self._counts["duplicates"] += 1
                    continue
                try:
                    _check_event(event)
                    entries.append(self._prices.price(event))
                except (ValueError, TypeError, AttributeError) as exc:
                    self._counts["rejected"] += 1
                    logger.warning("metrics event rejected: %s", exc)
                    continue
                batch_ids.add(event_id)
            if not entries:
                return 0
            inserted = await self._store.ledger_append(entries)
            if inserted == len(entries):
                for entry in entries:
                    self._agg.add_entry(entry)
                    self._remember(entry.event.event_id)
            else:
                # Some rows were in the store but not in our recent-id memory (older than
                # it, or written by another process): only the store knows which, so the
                # aggregates are rebuilt from it. Rare, and exact.
                self._counts["duplicates"] += len(entries) - inserted
                self._counts["resyncs"] += 1
                logger.warning("ledger skipped %d of %d events; rebuilding aggregates",
                               len(entries) - inserted, len(entries))
                await self._rebuild()
            self._counts["recorded"] += inserted
            return inserted

    def _remember(self, event_id: str) -> None:
        self._seen[event_id] = None
        if len(self._seen) > self._seen_cap:
            self._seen.popitem(last=False)

    async def set_gauge(self, name: str, labels: Mapping[str, str], value: float,
                        source: str = "") -> None:
        """Set a built-in gauge (:data:`BUILTIN_GAUGES`) as reported by ``source``.

        Values from different sources (gateway replicas) are summed; a source silent for
        ``GAUGE_TTL_S`` stops counting.

        Raises:
            InvalidRequest: unknown gauge, wrong labels, non-finite value.
        """
        self._gauges.set(name, labels, value, source)

    async def record_custom(self, name: str, kind: str, value: float,
                            labels: Optional[Mapping[str, str]] = None) -> None:
        """Set a custom gauge or add to a custom counter, exposed as ``troupe_custom_<name>``.

        Raises:
            InvalidRequest: bad name/kind/value/labels, or more than
                ``MAX_LABEL_SETS`` label sets for one metric; the message says why and
                shows a valid body.
        """
        self._custom.record(name, kind, value, labels or {})

    # ------------------------------------------------------------------ reading

    async def prometheus(self) -> bytes:
        """Prometheus text exposition (format 0.0.4) of every ``troupe_`` metric."""
        await self.start()
        return generate_latest(self._registry)

    async def usage(self, start_ts: float, end_ts: float, group_by: str = "model",
                    key_id: Optional[str] = None) -> dict:
        """Totals and latency percentiles per group for ``start_ts <= ts < end_ts``.

        Args:
            group_by: one of :data:`USAGE_GROUPS` (``key`` groups by API key id).
            key_id: only this API key's requests (a non-admin caller sees only its own).

        Raises:
            InvalidRequest: unknown ``group_by`` or a window that ends before it starts.
        """
        field = USAGE_GROUPS.get(group_by)
        if field is None:
            raise InvalidRequest(
                f"group_by must be one of model, provider, key, tier, route; got {group_by!r}. "
                "Example: /v1/usage?group_by=model&start=1700000000&end=1700086400",
                param="group_by")
        if not (start_ts <= end_ts):  # also refuses NaN
            raise InvalidRequest(
                f"the window must start before it ends (start={start_ts}, end={end_ts}). "
                "Example: /v1/usage?start=1700000000&end=1700086400", param="start")
        await self.start()
        groups: dict[str, dict[str, Any]] = {}
        everything = _new_usage()
        for entry in await self._store.ledger_window(start_ts, end_ts):
            if key_id is not None and entry.event.key_id != key_id:
                continue
            key = str(getattr(entry.event, field))
            group = groups.get(key)
            if group is None:
                group = groups[key] = _new_usage()
            _add_usage(group, entry)
            _add_usage(everything, entry)
        rows = [{"group": key, **_finish_usage(g)} for key, g in groups.items()]
        rows.sort(key=lambda r: (-r["cost_usd"], -r["requests"], r["group"]))
        return {
            "start_ts": start_ts,
            "end_ts": end_ts,
            "group_by": group_by,
            "totals": _finish_usage(everything),
            "groups": rows,
        }

    async def health(self) -> dict[str, Any]:
        """Liveness and bookkeeping: ledger size, events recorded/skipped, rebuild time."""
        out: dict[str, Any] = {"status": "ok", "store": _redact(self._store_url)}
        try:
            await self.start()
            out["ledger_entries"] = await self._store.ledger_count()
        except Exception as exc:  # health reports the failure instead of raising it
            out["status"] = "error"
            out["error"] = f"{type(exc).__name__}: {exc}"
        out.update(
            started_at=self._started_at,
            rebuild_s=round(self._rebuild_s, 6),
            series=len(self._agg.totals),
            custom_metrics=len(self._custom.metrics),
            **self._counts,
        )
        return out


def _new_usage() -> dict[str, Any]:
    return {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "cost_usd": 0.0, "estimated_entries": 0, "ttft": [], "e2e": []}


def _add_usage(acc: dict[str, Any], entry: LedgerEntry) -> None:
    ev = entry.event
    acc["requests"] += 1
    acc["errors"] += _is_error(ev.status, ev.error_code)
    acc["prompt_tokens"] += ev.prompt_tokens
    acc["completion_tokens"] += ev.completion_tokens
    acc["cost_usd"] += entry.cost_usd
    acc["estimated_entries"] += entry.cost_estimated
    if _finite_ms(ev.ttft_ms):
        acc["ttft"].append(ev.ttft_ms)
    if _finite_ms(ev.e2e_ms):
        acc["e2e"].append(ev.e2e_ms)


def _finish_usage(acc: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": acc["requests"],
        "errors": acc["errors"],
        "prompt_tokens": acc["prompt_tokens"],
        "completion_tokens": acc["completion_tokens"],
        "total_tokens": acc["prompt_tokens"] + acc["completion_tokens"],
        "cost_usd": round(acc["cost_usd"], 9),
        "estimated_entries": acc["estimated_entries"],
        "latency_ms": {"ttft": _percentiles(acc["ttft"]), "e2e": _percentiles(acc["e2e"])},
    }

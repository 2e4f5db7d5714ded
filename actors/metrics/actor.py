"""The metrics actor itself: records priced events in the ledger, keeps the aggregates
(:mod:`.aggregates`), custom metrics and gauges (:mod:`.custom`), and answers Prometheus
scrapes, usage summaries (:mod:`.usage`), traces and health."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from typing import Any, Iterator, Mapping, Optional, Sequence
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric

from actors.metrics.aggregates import (
    Aggregates,
    Buckets,
    ledger_families,
    resolve_buckets,
)
from actors.metrics.custom import CustomMetrics, Gauges
from actors.metrics.usage import USAGE_GROUPS, summarize
from actors.names import METRICS_ACTOR, NAMESPACE
from actors.traces import TraceBuffer
from serve_app.errors import InvalidRequest
from serve_app.pricing import PriceTable
from serve_app.protocol.metrics import LedgerEntry, RequestEvent
from serve_app.store.base import Store, open_store

__all__ = ["MetricsActor", "ACTOR_NAME", "ACTOR_NAMESPACE"]

logger = logging.getLogger("troupe.metrics")

ACTOR_NAME = METRICS_ACTOR
ACTOR_NAMESPACE = NAMESPACE
SERVE_READ_WAIT_S = 5.0  # a scrape waits at most this long for fresh replica counts


class _Collector:
    """prometheus_client collector over the actor's in-memory state."""

    def __init__(self, actor: "MetricsActor") -> None:
        self.actor = actor

    def collect(self) -> Iterator[Metric]:
        yield from ledger_families(self.actor._agg)
        yield from self.actor._gauges.families()
        yield from self.actor._custom.families()


def _redact(url: str) -> str:
    """The store URL without a password (health output is not secret)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _check_event(event: RequestEvent) -> None:
    """Refuse what the store cannot hold, so one bad event cannot block its batch forever."""
    for field in ("e2e_ms", "ttft_ms", "queue_ms", "ts", "audio_in_s", "audio_out_s", "ttfa_ms"):
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
        self._bounds = resolve_buckets(histogram_buckets_ms)
        self._agg = Aggregates(self._bounds)
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._seen_cap = seen_ids
        self._gauges = Gauges()
        self._custom = CustomMetrics()
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self))
        self._start_lock = asyncio.Lock()
        self._record_lock = asyncio.Lock()
        self._started = False
        self._started_at: Optional[float] = None
        self._rebuild_s = 0.0
        self._counts = {"recorded": 0, "duplicates": 0, "rejected": 0, "resyncs": 0}
        self._traces = TraceBuffer(max_traces, max_spans_per_trace)
        self._serve_poll_s = serve_poll_s  # 0: do not read Serve (plain-class tests)
        self._serve_read: Optional[asyncio.Task] = None
        self._serve_read_at = -math.inf

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

    async def _refresh_replicas(self) -> None:
        """Replicas per deployment and state, read from Serve's controller when a scrape
        finds them older than ``serve_poll_s`` (issue 20: no background poll, so an idle,
        unscraped gateway asks the controller nothing; concurrent scrapes share one read)."""
        if not self._serve_poll_s or time.monotonic() - self._serve_read_at < self._serve_poll_s:
            return
        if self._serve_read is None or self._serve_read.done():
            self._serve_read = asyncio.get_running_loop().create_task(self._read_serve())
        try:
            await asyncio.wait_for(asyncio.shield(self._serve_read), SERVE_READ_WAIT_S)
        except asyncio.TimeoutError:  # a slow controller: this scrape shows the last counts
            logger.debug("serve.status() slower than %.1f s", SERVE_READ_WAIT_S)

    async def _read_serve(self) -> None:
        from ray import serve

        try:
            status = await asyncio.to_thread(serve.status)
        except Exception:  # Serve not up yet, or shutting down: the next scrape tries again
            logger.debug("serve.status() failed", exc_info=True)
            return
        self._serve_read_at = time.monotonic()
        for app_name, app in status.applications.items():
            for dep_name, dep in app.deployments.items():
                for state, count in (dep.replica_states or {}).items():
                    labels = {"application": app_name, "deployment": dep_name,
                              "state": str(getattr(state, "value", state))}
                    self._gauges.set("replicas", labels, count, "serve")

    async def close(self) -> None:
        """Release the store's connections."""
        if self._started:
            self._started = False
            await self._store.close()

    async def _rebuild(self) -> None:
        began = time.perf_counter()
        agg = Aggregates(self._bounds)
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
        await self._refresh_replicas()
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
        entries = await self._store.ledger_window(start_ts, end_ts)
        totals, rows = summarize(entries, field, key_id)
        return {
            "start_ts": start_ts,
            "end_ts": end_ts,
            "group_by": group_by,
            "totals": totals,
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

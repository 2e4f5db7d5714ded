"""MetricsActor driven directly (no Ray): exact totals, idempotency, rebuild, usage, custom."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
from typing import Any, Sequence

import pytest
from prometheus_client.parser import text_string_to_metric_families

from actors.metrics import MAX_LABEL_SETS, MetricsActor
from serve_app.errors import InvalidRequest
from serve_app.protocol.metrics import LedgerEntry, RequestEvent
from serve_app.store.rows import LedgerTotalsRow

PRICES = {"local-llm": {"input_usd_per_million": 0.5, "output_usd_per_million": 1.5}}
CHAT = "/v1/chat/completions"


class FakeStore:
    """In-memory Store (same protocol as serve_app.store.base.Store)."""

    def __init__(self) -> None:
        self.url = "memory://"
        self.rows: dict[str, LedgerEntry] = {}
        self.fail_next_append = False
        self.opened = 0

    async def open(self) -> None:
        self.opened += 1

    async def close(self) -> None:
        pass

    async def ledger_append(self, entries: Sequence[LedgerEntry]) -> int:
        if self.fail_next_append:
            self.fail_next_append = False
            raise ConnectionError("store unavailable")
        new = 0
        for entry in entries:
            if entry.event.event_id not in self.rows:
                self.rows[entry.event.event_id] = entry
                new += 1
        return new

    async def ledger_totals(self) -> list[LedgerTotalsRow]:
        sums: dict[tuple, list] = {}
        for e in self.rows.values():
            ev = e.event
            key = (ev.model, ev.provider, ev.route, ev.key_id, ev.tier, ev.status, ev.error_code)
            acc = sums.setdefault(key, [0, 0, 0, 0.0, 0])
            acc[0] += 1
            acc[1] += ev.prompt_tokens
            acc[2] += ev.completion_tokens
            acc[3] += e.cost_usd
            acc[4] += e.cost_estimated
        return [LedgerTotalsRow(*key, *acc) for key, acc in sums.items()]

    async def ledger_window(self, start_ts: float, end_ts: float) -> list[LedgerEntry]:
        found = [e for e in self.rows.values() if start_ts <= e.event.ts < end_ts]
        return sorted(found, key=lambda e: (e.event.ts, e.event.event_id))

    async def ledger_count(self) -> int:
        return len(self.rows)


def ev(event_id: str, **kw: Any) -> RequestEvent:
    base: dict[str, Any] = dict(event_id=event_id, ts=1000.0, model="gpt-4o", route=CHAT,
                                provider="openai", e2e_ms=100.0)
    base.update(kw)
    return RequestEvent(**base)


def known_mix() -> list[RequestEvent]:
    """Five requests: two remote, a cancelled local stream, a failed one, a cut stream."""
    return [
        ev("a", prompt_tokens=1000, completion_tokens=500, ttft_ms=120.0, e2e_ms=800.0,
           queue_ms=2.0, stream=True, inter_token_ms=[10.0, 12.0, 30.0], finish_reason="stop"),
        ev("b", prompt_tokens=200, completion_tokens=50, ttft_ms=90.0, e2e_ms=400.0,
           key_id="k2", tier="flex", finish_reason="length"),
        ev("c", model="local-llm", provider="local", route="/ws", prompt_tokens=40,
           completion_tokens=17, ttft_ms=30.0, e2e_ms=250.0, stream=True,
           inter_token_ms=[5.0] * 16, finish_reason="cancelled"),
        ev("d", model="local-llm", provider="local", status=500, error_code="INFERENCE_FAILED",
           prompt_tokens=12, completion_tokens=3, e2e_ms=60.0),
        ev("e", model="claude-3-5-haiku", provider="anthropic", route="/v1/messages",
           prompt_tokens=300, completion_tokens=80, usage_estimated=True, ttft_ms=200.0,
           e2e_ms=1500.0, stream=True),
    ]


COSTS = {
    "a": (1000 * 2.50 + 500 * 10.00) / 1e6,
    "b": (200 * 2.50 + 50 * 10.00) / 1e6,
    "c": (40 * 0.5 + 17 * 1.5) / 1e6,
    "d": (12 * 0.5 + 3 * 1.5) / 1e6,
    "e": (300 * 0.80 + 80 * 4.00) / 1e6,
}


def samples(text: bytes) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(metrics: dict[tuple, float], name: str, **labels: str) -> float:
    return sum(v for (n, lbl), v in metrics.items()
               if n == name and all(dict(lbl).get(k) == x for k, x in labels.items()))


@pytest.fixture()
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture()
def actor(store: FakeStore) -> MetricsActor:
    return MetricsActor("memory://", PRICES, store=store)


async def test_exact_totals_cost_and_flags_for_a_known_mix(actor: MetricsActor,
                                                          store: FakeStore) -> None:
    assert await actor.record(known_mix()) == 5
    m = samples(await actor.prometheus())
    assert total(m, "troupe_requests_total") == 5
    assert total(m, "troupe_requests_total", status="500") == 1
    assert total(m, "troupe_errors_total", code="INFERENCE_FAILED", model="local-llm") == 1
    assert total(m, "troupe_errors_total") == 1
    assert total(m, "troupe_tokens_total", kind="prompt") == 1552
    assert total(m, "troupe_tokens_total", kind="completion") == 650
    assert total(m, "troupe_tokens_total", kind="completion", route="/ws") == 17  # cancelled
    assert total(m, "troupe_cost_usd_total") == pytest.approx(sum(COSTS.values()), abs=1e-9)
    assert total(m, "troupe_cost_usd_total", model="gpt-4o", key_id="k2", tier="flex") == (
        pytest.approx(COSTS["b"], abs=1e-9))
    assert total(m, "troupe_cost_estimated_requests_total") == 1  # the cut stream
    # Histograms: one e2e per request, ttft where measured, one inter-token per gap.
    assert total(m, "troupe_e2e_seconds_count") == 5
    assert total(m, "troupe_ttft_seconds_count") == 4
    assert total(m, "troupe_inter_token_seconds_count") == 19
    assert total(m, "troupe_queue_wait_seconds_count") == 1
    assert total(m, "troupe_e2e_seconds_sum") == pytest.approx(3.01, abs=1e-9)
    # Cumulative buckets: the cancelled stream took exactly 250 ms ("le" includes the bound).
    assert total(m, "troupe_e2e_seconds_bucket", le="0.1", route="/ws") == 0
    assert total(m, "troupe_e2e_seconds_bucket", le="0.25", route="/ws") == 1
    assert total(m, "troupe_e2e_seconds_bucket", le="0.25", model="local-llm") == 2
    assert m[("troupe_e2e_seconds_bucket", (("le", "+Inf"), ("model", "gpt-4o"),
                                            ("route", CHAT), ("tier", "default")))] == 1
    costs = {e.event.event_id: e.cost_usd for e in store.rows.values()}
    assert costs == pytest.approx(COSTS, abs=1e-12)


async def test_rerecording_a_batch_counts_nothing_twice(actor: MetricsActor) -> None:
    batch = known_mix()
    await actor.record(batch)
    before = await actor.prometheus()
    assert await actor.record(batch) == 0
    # A retry merged with new events (the recorder re-batches after a failure).
    assert await actor.record([*batch[:2], ev("f", prompt_tokens=1), batch[0]]) == 1
    m = samples(await actor.prometheus())
    assert total(m, "troupe_requests_total") == 6
    assert total(m, "troupe_tokens_total", kind="prompt") == 1553
    assert samples(before).keys() <= m.keys()
    health = await actor.health()
    assert (health["recorded"], health["duplicates"], health["ledger_entries"]) == (6, 8, 6)


async def test_duplicates_older_than_the_id_memory_are_still_counted_once(store) -> None:
    actor = MetricsActor("memory://", PRICES, store=store, seen_ids=2)
    await actor.record(known_mix())
    assert await actor.record([ev("a", prompt_tokens=1000), ev("g", prompt_tokens=5)]) == 1
    m = samples(await actor.prometheus())
    assert total(m, "troupe_requests_total") == 6
    assert total(m, "troupe_tokens_total", kind="prompt") == 1557
    assert total(m, "troupe_e2e_seconds_count") == 6
    assert (await actor.health())["resyncs"] == 1


async def test_store_failure_propagates_and_the_retry_counts_once(actor, store) -> None:
    store.fail_next_append = True
    with pytest.raises(ConnectionError):
        await actor.record(known_mix())
    assert total(samples(await actor.prometheus()), "troupe_requests_total") == 0
    assert await actor.record(known_mix()) == 5
    assert total(samples(await actor.prometheus()), "troupe_requests_total") == 5


async def test_unpriceable_events_are_dropped_without_blocking_the_batch(actor) -> None:
    bad = [ev("neg", prompt_tokens=-3), ev("nan", e2e_ms=math.nan),
           ev("gap", inter_token_ms=[1.0, math.inf])]
    assert await actor.record([*bad, ev("ok")]) == 1
    assert (await actor.health())["rejected"] == 3


async def test_restart_rebuilds_identical_counters_and_histograms(actor, store) -> None:
    await actor.record(known_mix())
    await actor.record([ev(f"x{i}", e2e_ms=float(i), ttft_ms=1.0 + i, ts=1000.0 + i,
                           inter_token_ms=[0.5 * i]) for i in range(50)])
    await actor.set_gauge("in_flight_requests", {"deployment": "LLM_a"}, 3)
    before = samples(await actor.prometheus())
    restarted = MetricsActor("memory://", PRICES, store=store)  # a new process, same ledger
    await restarted.start()
    after = samples(await restarted.prometheus())
    ledger_before = {k: v for k, v in before.items() if not k[0].startswith("troupe_in_flight")}
    ledger_after = {k: v for k, v in after.items() if not k[0].startswith("troupe_in_flight")}
    assert ledger_after == ledger_before
    assert total(after, "troupe_inter_token_seconds_count") == 69
    assert await restarted.record(known_mix()) == 0  # ids survive the restart too


async def test_usage_groups_totals_and_window(actor: MetricsActor) -> None:
    events = known_mix()
    events.append(ev("late", ts=5000.0, prompt_tokens=7, completion_tokens=1))
    await actor.record(events)
    by_model = await actor.usage(0, 2000, "model")
    groups = {g["group"]: g for g in by_model["groups"]}
    assert set(groups) == {"gpt-4o", "local-llm", "claude-3-5-haiku"}
    assert groups["local-llm"]["requests"] == 2 and groups["local-llm"]["errors"] == 1
    assert groups["gpt-4o"]["prompt_tokens"] == 1200
    assert groups["gpt-4o"]["cost_usd"] == pytest.approx(COSTS["a"] + COSTS["b"], abs=1e-9)
    assert groups["claude-3-5-haiku"]["estimated_entries"] == 1
    assert by_model["totals"]["requests"] == 5
    assert by_model["totals"]["cost_usd"] == pytest.approx(sum(COSTS.values()), abs=1e-9)
    assert [g["group"] for g in by_model["groups"]][0] == "gpt-4o"  # most expensive first

    by_key = await actor.usage(0, 10_000, "key")
    assert {g["group"]: g["requests"] for g in by_key["groups"]} == {"anonymous": 5, "k2": 1}
    by_tier = await actor.usage(0, 10_000, "tier")
    assert {g["group"]: g["requests"] for g in by_tier["groups"]} == {"default": 5, "flex": 1}
    by_provider = await actor.usage(0, 10_000, "provider")
    assert {g["group"] for g in by_provider["groups"]} == {"openai", "local", "anthropic"}
    by_route = await actor.usage(0, 10_000, "route")
    assert {g["group"]: g["requests"] for g in by_route["groups"]}[CHAT] == 4

    late_only = await actor.usage(5000, 5001, "model")
    assert late_only["totals"]["requests"] == 1
    assert (await actor.usage(1000.5, 5000, "model"))["totals"]["requests"] == 0  # end excluded


async def test_usage_latency_percentiles_are_nearest_rank(actor: MetricsActor) -> None:
    await actor.record([ev(f"p{i}", e2e_ms=float(i), ttft_ms=float(i) / 10) for i in range(1, 101)])
    latency = (await actor.usage(0, 2000, "model"))["groups"][0]["latency_ms"]
    assert latency["e2e"] == {"p50": 50.0, "p90": 90.0, "p99": 99.0, "count": 100}
    assert latency["ttft"]["p90"] == pytest.approx(9.0)
    empty = (await actor.usage(0, 1, "model"))["totals"]["latency_ms"]["ttft"]
    assert empty == {"p50": None, "p90": None, "p99": None, "count": 0}


@pytest.mark.parametrize("args, param", [
    ((0, 10, "user"), "group_by"),
    ((10, 0, "model"), "start"),
    ((math.nan, 10, "model"), "start"),
])
async def test_usage_rejects_bad_arguments(actor, args, param) -> None:
    with pytest.raises(InvalidRequest) as info:
        await actor.usage(*args)
    assert info.value.param == param and "Example" in info.value.message


async def test_custom_gauge_and_counter_are_exposed_with_prefix(actor: MetricsActor) -> None:
    await actor.record_custom("queue_depth", "gauge", 3, {"region": "eu"})
    await actor.record_custom("queue_depth", "gauge", 5, {"region": "eu"})
    await actor.record_custom("jobs_total", "counter", 2, {"kind": "batch"})
    await actor.record_custom("jobs", "counter", 1.5, {"kind": "batch"})
    m = samples(await actor.prometheus())
    assert m[("troupe_custom_queue_depth", (("region", "eu"),))] == 5
    assert m[("troupe_custom_jobs_total", (("kind", "batch"),))] == 3.5


@pytest.mark.parametrize("name, kind, value, labels, fragment", [
    ("1bad", "gauge", 1, {}, "metric name"),
    ("has-dash", "gauge", 1, {}, "metric name"),
    ("x" * 101, "gauge", 1, {}, "at most 100"),
    ("ok", "histogram", 1, {}, "kind must be"),
    ("ok", "gauge", math.nan, {}, "finite number"),
    ("ok", "gauge", "3", {}, "finite number"),
    ("ok", "gauge", 1, {f"l{i}": "v" for i in range(9)}, "at most 8"),
    ("ok", "gauge", 1, {"__x": "v"}, "label name"),
    ("ok", "gauge", 1, {"9a": "v"}, "label name"),
    ("ok", "gauge", 1, {"a": 3}, "string value"),
    ("ok", "counter", -1, {}, "only goes up"),
    ("ok_total", "gauge", 1, {}, "may not end in '_total'"),
])
async def test_custom_metric_validation_says_what_is_wrong(actor, name, kind, value, labels,
                                                           fragment) -> None:
    with pytest.raises(InvalidRequest) as info:
        await actor.record_custom(name, kind, value, labels)
    assert fragment in info.value.message
    assert '"name": "queue_depth"' in info.value.message  # a valid example


async def test_custom_metric_keeps_its_kind_and_label_names(actor: MetricsActor) -> None:
    await actor.record_custom("depth", "gauge", 1, {"region": "eu"})
    with pytest.raises(InvalidRequest, match="is a gauge"):
        await actor.record_custom("depth", "counter", 1, {"region": "eu"})
    with pytest.raises(InvalidRequest, match="exactly those"):
        await actor.record_custom("depth", "gauge", 1, {"zone": "a"})


async def test_custom_metric_cardinality_is_bounded(actor: MetricsActor) -> None:
    for i in range(MAX_LABEL_SETS):
        await actor.record_custom("per_user", "counter", 1, {"user": f"u{i}"})
    with pytest.raises(InvalidRequest, match="cardinality"):
        await actor.record_custom("per_user", "counter", 1, {"user": "one-too-many"})
    await actor.record_custom("per_user", "counter", 1, {"user": "u0"})  # existing set: fine
    m = samples(await actor.prometheus())
    assert total(m, "troupe_custom_per_user_total") == MAX_LABEL_SETS + 1


async def test_in_flight_gauge_sums_sources_and_forgets_silent_ones(actor) -> None:
    await actor.set_gauge("in_flight_requests", {"deployment": "LLM_a"}, 3, source="gw-1")
    await actor.set_gauge("in_flight_requests", {"deployment": "LLM_a"}, 4, source="gw-2")
    m = samples(await actor.prometheus())
    assert m[("troupe_in_flight_requests", (("deployment", "LLM_a"),))] == 7
    actor._gauges.ttl_s = 0.0  # every source is now silent for longer than the TTL
    m = samples(await actor.prometheus())
    assert m[("troupe_in_flight_requests", (("deployment", "LLM_a"),))] == 0
    with pytest.raises(InvalidRequest, match="unknown gauge"):
        await actor.set_gauge("nope", {}, 1)


async def test_engine_queue_gauges_are_per_replica_and_a_gone_replica_drops_out(actor) -> None:
    labels = {"deployment": "LLM_a", "model": "a", "replica": "r1"}
    await actor.set_gauge("engine_queue_depth", labels, 5, source="r1")
    await actor.set_gauge("engine_expected_wait_seconds", labels, 2.5, source="r1")
    m = samples(await actor.prometheus())
    key = tuple(sorted(labels.items()))
    assert m[("troupe_engine_queue_depth", key)] == 5
    assert m[("troupe_engine_expected_wait_seconds", key)] == 2.5
    actor._gauges.ttl_s = 0.0  # the replica went quiet (it died): its series goes
    m = samples(await actor.prometheus())
    assert ("troupe_engine_queue_depth", key) not in m


async def test_health_reports_ledger_and_redacts_the_store_password(store) -> None:
    actor = MetricsActor("postgresql://troupe:s3cret@db:5432/troupe", store=store)
    await actor.record(known_mix())
    health = await actor.health()
    assert health["status"] == "ok" and health["ledger_entries"] == 5
    assert "s3cret" not in health["store"] and "***" in health["store"]


async def test_store_is_opened_once_and_lazily(store: FakeStore) -> None:
    actor = MetricsActor("memory://", store=store)
    await actor.prometheus()
    await actor.record([ev("z")])
    assert store.opened == 1


async def test_prometheus_output_passes_promtool(actor: MetricsActor) -> None:
    promtool = shutil.which("promtool") or ("/usr/bin/promtool"
                                            if os.path.exists("/usr/bin/promtool") else None)
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is required in CI (Debian package 'prometheus')")
        pytest.skip("promtool not installed (apt-get install prometheus)")
    await actor.record(known_mix())
    await actor.record_custom("queue_depth", "gauge", 3, {"region": "eu"})
    await actor.record_custom("jobs", "counter", 1, {"kind": "batch"})
    await actor.set_gauge("in_flight_requests", {"deployment": "LLM_a"}, 2, source="gw")
    text = await actor.prometheus()
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                          timeout=30)
    assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()


async def test_real_sqlite_store_round_trip(tmp_path) -> None:
    sqlite = pytest.importorskip("serve_app.store.sqlite")
    url = f"sqlite:///{tmp_path}/ledger.db"
    first = MetricsActor(url, PRICES)
    await first.record(known_mix())
    before = samples(await first.prometheus())
    await first.close()
    second = MetricsActor(url, PRICES)
    after = samples(await second.prometheus())
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key] == pytest.approx(value, abs=1e-9), key
    assert await second.record(known_mix()[:2]) == 0
    assert isinstance(second._store, sqlite.SQLiteStore)
    await second.close()


async def test_realtime_response_rows_keep_audio_and_ttfa_through_sqlite(tmp_path) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    first = MetricsActor(url, PRICES)
    turns = [RequestEvent(f"rt{n}", 1000.0 + n, "local-llm", "/v1/realtime", stream=True, prompt_tokens=20,
                          completion_tokens=10, e2e_ms=900.0, audio_in_s=1.5, audio_out_s=2.25,
                          ttfa_ms=ttfa) for n, ttfa in enumerate((420.0, 1300.0))]
    await first.record([*turns, *known_mix()])
    await first.close()
    second = MetricsActor(url, PRICES)  # what the ledger kept, not what was in memory
    usage = await second.usage(0, 2e9, group_by="route")
    row = next(g for g in usage["groups"] if g["group"] == "/v1/realtime")
    assert row["audio_seconds"] == {"input": 3.0, "output": 4.5}
    assert row["latency_ms"]["ttfa"] == {"p50": 420.0, "p90": 1300.0, "p99": 1300.0, "count": 2}
    assert row["completion_tokens"] == 20 and row["cost_usd"] > 0
    text = await second.prometheus()
    m = samples(text)
    series = (("model", "local-llm"), ("route", "/v1/realtime"), ("tier", "default"))
    assert m[("troupe_realtime_ttfa_seconds_count", series)] == 2
    assert m[("troupe_realtime_ttfa_seconds_bucket", (("le", "0.5"), *series))] == 1
    assert m[("troupe_realtime_ttfa_seconds_sum", series)] == pytest.approx(1.72)
    await second.close()
    if shutil.which("promtool"):
        proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                              timeout=30)
        assert proc.returncode == 0, (proc.stdout + proc.stderr).decode()


class _ServeStatus:
    """What ``serve.status()`` answers, for one app with one deployment; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.running = 2

    def __call__(self) -> Any:
        from types import SimpleNamespace

        self.calls += 1
        dep = SimpleNamespace(replica_states={"RUNNING": self.running})
        return SimpleNamespace(applications={
            "troupe": SimpleNamespace(deployments={"LLM_a": dep})})


async def test_replica_counts_are_read_at_scrape_time_not_in_the_background(
        store: FakeStore, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import serve

    status = _ServeStatus()
    monkeypatch.setattr(serve, "status", status)
    actor = MetricsActor("memory://", PRICES, store=store, serve_poll_s=3600)
    await actor.start()
    await actor.record(known_mix())
    assert status.calls == 0  # idle, unscraped: the controller is not asked
    assert total(samples(await actor.prometheus()), "troupe_replicas", state="RUNNING") == 2
    status.running = 3
    assert total(samples(await actor.prometheus()), "troupe_replicas", state="RUNNING") == 2
    assert status.calls == 1  # younger than serve_poll_s: the last counts, no second read
    actor._serve_read_at -= 3600  # the counts age past serve_poll_s
    assert total(samples(await actor.prometheus()), "troupe_replicas", state="RUNNING") == 3
    assert status.calls == 2


async def test_serve_poll_zero_never_asks_serve(store: FakeStore,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import serve

    status = _ServeStatus()
    monkeypatch.setattr(serve, "status", status)
    actor = MetricsActor("memory://", PRICES, store=store, serve_poll_s=0)
    await actor.prometheus()
    assert status.calls == 0

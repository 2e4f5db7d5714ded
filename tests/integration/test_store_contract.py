"""The store contract, run unchanged against SQLite and a real (private) PostgreSQL server.

Each test gets an empty database: a file under ``tmp_path`` for SQLite, a fresh database
on the module's private PostgreSQL server (see ``tests/store_server.py``) for PostgreSQL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import pytest

from serve_app.protocol.metrics import LedgerEntry, RequestEvent
from serve_app.store import Store
from serve_app.store.policy_rows import ApiKeyRow, BatchItemRow, BatchJobRow
from serve_app.store.postgres import PostgresStore
from serve_app.store.rows import EVENT_COLUMNS, LedgerTotalsRow
from serve_app.store.sqlite import SQLiteStore
from tests.store_server import PostgresServer, postgres_server_fixture

postgres_server = postgres_server_fixture(scope="module")

StoreFactory = Callable[[], Store]

_ids = itertools.count()


def entry(
    *, event_id: str | None = None, ts: float = 1000.0, cost_usd: float = 0.001,
    cost_estimated: bool = False, price_source: str = "config", **event_fields: object,
) -> LedgerEntry:
    """A ledger entry with defaults for everything the test does not care about."""
    event_fields.setdefault("model", "mock-5ms")
    event_fields.setdefault("route", "/v1/chat/completions")
    event = RequestEvent(event_id=event_id or f"req-{next(_ids):06d}", ts=ts, **event_fields)
    return LedgerEntry(event=event, cost_usd=cost_usd, cost_estimated=cost_estimated,
                       price_source=price_source)


async def _create_database(server: PostgresServer) -> str:
    name = f"t_{uuid.uuid4().hex[:16]}"
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return server.dsn_for(name)


@pytest.fixture(params=["sqlite", "postgres"])
async def make_store(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[StoreFactory]:
    """A factory of unopened stores on one empty database; every store it made is closed."""
    if request.param == "sqlite":
        location = str(tmp_path / "state" / "troupe.db")  # the directory does not exist yet
    else:
        server: PostgresServer = request.getfixturevalue("postgres_server")
        location = await _create_database(server)
    made: list[Store] = []

    def factory() -> Store:
        store: Store = (SQLiteStore(location) if request.param == "sqlite"
                        else PostgresStore(location, max_size=5))
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.close()


@pytest.fixture()
async def store(make_store: StoreFactory) -> Store:
    """An open store on an empty database."""
    opened = make_store()
    await opened.open()
    return opened


def _by_id(entries: list[LedgerEntry]) -> dict[str, LedgerEntry]:
    return {e.event.event_id: e for e in entries}


async def _all(store: Store) -> list[LedgerEntry]:
    return await store.ledger_window(float("-inf"), float("inf"))


# --- lifecycle ---------------------------------------------------------------------------


async def test_open_is_idempotent_and_reopen_keeps_data(make_store: StoreFactory) -> None:
    first = make_store()
    await first.open()
    await first.open()  # a second open on the same store is a no-op
    assert isinstance(first, Store)
    assert await first.ledger_append([entry(event_id="a"), entry(event_id="b")]) == 2

    second = make_store()  # another process opening the migrated database
    await second.open()
    assert await second.ledger_count() == 2
    assert await second.ledger_append([entry(event_id="c")]) == 1
    assert await first.ledger_count() == 3


async def test_data_survives_close_and_reopen(make_store: StoreFactory) -> None:
    written = [entry(ts=1000.0 + i, prompt_tokens=i, cost_usd=i / 7) for i in range(5)]
    store = make_store()
    await store.open()
    await store.ledger_append(written)
    await store.close()
    await store.close()  # closing twice is harmless

    with pytest.raises(RuntimeError, match="not open"):
        await store.ledger_count()

    reopened = make_store()
    await reopened.open()
    assert await _all(reopened) == written
    await store.open()  # the closed store can be opened again too
    assert await store.ledger_count() == 5


# --- append --------------------------------------------------------------------------------


async def test_append_and_count(store: Store) -> None:
    assert await store.ledger_count() == 0
    assert await store.ledger_append([]) == 0
    assert await store.ledger_append([entry() for _ in range(3)]) == 3
    assert await store.ledger_append([entry()]) == 1
    assert await store.ledger_count() == 4


async def test_duplicate_ids_in_one_batch_are_skipped_first_wins(store: Store) -> None:
    batch = [
        entry(event_id="dup", prompt_tokens=1),
        entry(event_id="other"),
        entry(event_id="dup", prompt_tokens=2),
    ]
    assert await store.ledger_append(batch) == 2
    assert await store.ledger_count() == 2
    assert _by_id(await _all(store))["dup"].event.prompt_tokens == 1


async def test_duplicate_ids_across_batches_count_only_new_rows(store: Store) -> None:
    first = [entry(event_id=f"e{i}") for i in range(4)]
    assert await store.ledger_append(first) == 4
    assert await store.ledger_append(first) == 0  # a retried batch adds nothing
    retry_plus_new = first[2:] + [entry(event_id="e4"), entry(event_id="e5")]
    assert await store.ledger_append(retry_plus_new) == 2
    assert await store.ledger_count() == 6


async def test_failed_batch_writes_nothing(store: Store) -> None:
    await store.ledger_append([entry(event_id="kept")])
    bad = entry(event_id="bad")
    bad.event.model = None  # type: ignore[assignment]  # violates NOT NULL
    batch = [entry(event_id="new-1"), bad, entry(event_id="new-2")]
    with pytest.raises((sqlite3.IntegrityError, asyncpg.NotNullViolationError)):
        await store.ledger_append(batch)
    assert [e.event.event_id for e in await _all(store)] == ["kept"]


async def test_non_finite_inter_token_gap_is_refused(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.ledger_append([entry(inter_token_ms=[1.0, float("nan")])])
    assert await store.ledger_count() == 0


async def test_concurrent_appends_lose_nothing(store: Store) -> None:
    async def one_task(task: int) -> int:
        own = [entry(event_id=f"t{task:02d}-{i}") for i in range(4)]
        shared = entry(event_id="shared-by-all")  # every task also sends the same event
        return await store.ledger_append(own + [shared])

    added = await asyncio.gather(*(one_task(t) for t in range(50)))
    assert sum(added) == 50 * 4 + 1
    assert await store.ledger_count() == 201
    assert len(await _all(store)) == 201


# --- reading -------------------------------------------------------------------------------


async def test_totals_group_and_sum_exactly(store: Store) -> None:
    costs = [0.1, 0.2, 0.3, 1e-6, 0.000123]
    await store.ledger_append([
        *(entry(model="m-a", prompt_tokens=10, completion_tokens=5, cost_usd=c) for c in costs),
        entry(model="m-a", key_id="k1", prompt_tokens=3, completion_tokens=4, cost_usd=0.5),
        entry(model="m-a", status=500, error_code="ENGINE_ERROR", cost_usd=0.0),
        entry(model="m-a", status=500, error_code="ENGINE_ERROR", cost_usd=0.0),
        entry(model="m-a", status=500, error_code=None, cost_usd=0.0),
        entry(model="m-a", status=504, error_code="DEADLINE", tier="flex", cost_usd=0.0),
        entry(model="gpt-x", provider="openai", prompt_tokens=2**40, completion_tokens=7,
              cost_usd=12.5, cost_estimated=True),
        entry(model="gpt-x", provider="openai", prompt_tokens=1, completion_tokens=1,
              cost_usd=0.25, cost_estimated=True),
        entry(model="gpt-x", provider="openai", prompt_tokens=1, completion_tokens=1,
              cost_usd=0.25),
        entry(model="Zeta-1b", prompt_tokens=1, completion_tokens=1, cost_usd=0.01),
    ])
    totals = await store.ledger_totals()
    assert all(isinstance(row, LedgerTotalsRow) for row in totals)
    got = {(r.model, r.provider, r.route, r.key_id, r.tier, r.status, r.error_code): r
           for r in totals}
    assert len(got) == len(totals) == 7
    route = "/v1/chat/completions"

    plain = got[("m-a", "local", route, "anonymous", "default", 200, None)]
    assert (plain.requests, plain.prompt_tokens, plain.completion_tokens) == (5, 50, 25)
    assert plain.cost_usd == pytest.approx(sum(costs), abs=1e-9)
    assert plain.estimated == 0
    keyed = got[("m-a", "local", route, "k1", "default", 200, None)]
    assert (keyed.requests, keyed.prompt_tokens, keyed.cost_usd) == (1, 3, 0.5)
    failed = got[("m-a", "local", route, "anonymous", "default", 500, "ENGINE_ERROR")]
    assert (failed.requests, failed.cost_usd) == (2, 0.0)
    assert got[("m-a", "local", route, "anonymous", "flex", 504, "DEADLINE")].requests == 1
    remote = got[("gpt-x", "openai", route, "anonymous", "default", 200, None)]
    assert (remote.requests, remote.prompt_tokens, remote.completion_tokens) == (3, 2**40 + 2, 9)
    assert remote.cost_usd == pytest.approx(13.0, abs=1e-9)
    assert remote.estimated == 2  # two of the three were priced by estimate

    assert got[("m-a", "local", route, "anonymous", "default", 500, None)].requests == 1

    # Ordered by the group key: text bytewise ("Z" < "g"), a missing error code first.
    assert [(r.model, r.key_id, r.tier, r.status, r.error_code) for r in totals] == [
        ("Zeta-1b", "anonymous", "default", 200, None),
        ("gpt-x", "anonymous", "default", 200, None),
        ("m-a", "anonymous", "default", 200, None),
        ("m-a", "anonymous", "default", 500, None),
        ("m-a", "anonymous", "default", 500, "ENGINE_ERROR"),
        ("m-a", "anonymous", "flex", 504, "DEADLINE"),
        ("m-a", "k1", "default", 200, None),
    ]


async def test_totals_of_empty_ledger(store: Store) -> None:
    assert await store.ledger_totals() == []


async def test_window_is_half_open_and_oldest_first(store: Store) -> None:
    stamps = {"before": 99.999999, "start": 100.0, "mid-b": 150.25, "mid-a": 150.25,
              "Mid-c": 150.25, "last": 199.999999, "end": 200.0, "after": 250.0}
    await store.ledger_append([entry(event_id=k, ts=ts) for k, ts in stamps.items()])
    window = await store.ledger_window(100.0, 200.0)
    # [start, end): the start is in, the end is out; equal stamps by event id, bytewise.
    assert [e.event.event_id for e in window] == ["start", "Mid-c", "mid-a", "mid-b", "last"]
    assert [e.event.ts for e in window] == [100.0, 150.25, 150.25, 150.25, 199.999999]
    assert await store.ledger_window(200.0, 200.0) == []
    assert await store.ledger_window(300.0, 400.0) == []


async def test_every_field_round_trips_exactly(store: Store) -> None:
    gaps = [0.1, 1 / 3, 1e-7, 12345.678901234, 0.0, 1e20, 2.5e-300]
    full = entry(
        event_id="full", ts=1767225600.123456, model="m", route="/ws", provider="openai",
        key_id="key-7", tier="priority", status=499, error_code="CANCELLED",
        finish_reason="cancelled", stream=True, prompt_tokens=123, completion_tokens=456,
        usage_estimated=True, queue_ms=1.25, ttft_ms=33.3333333333, e2e_ms=812.0000001,
        inter_token_ms=gaps, replica_busy_s=0.7071067811865476, cost_usd=0.000123456789,
        cost_estimated=True, price_source="table:openai 2026-10-01 ünïcode",
    )
    await store.ledger_append([full])
    [back] = await _all(store)
    assert back == full
    assert back.event.inter_token_ms == gaps
    assert all(type(g) is float for g in back.event.inter_token_ms)
    assert type(back.event.stream) is bool and type(back.cost_estimated) is bool


async def test_none_and_empty_fields_round_trip(store: Store) -> None:
    sparse = entry(event_id="sparse", error_code=None, finish_reason=None, queue_ms=None,
                   ttft_ms=None, replica_busy_s=None, inter_token_ms=[])
    await store.ledger_append([sparse])
    [back] = await _all(store)
    assert back == sparse
    ev = back.event
    assert (ev.error_code, ev.finish_reason, ev.queue_ms, ev.ttft_ms, ev.replica_busy_s) == (
        None, None, None, None, None)
    assert ev.inter_token_ms == []


def test_every_request_event_field_has_a_column() -> None:
    assert EVENT_COLUMNS == tuple(f.name for f in dataclasses.fields(RequestEvent))


def test_sqlite_store_creates_nothing_until_open(tmp_path: Path) -> None:
    SQLiteStore(tmp_path / "later" / "troupe.db")
    assert not (tmp_path / "later").exists()


async def test_sqlite_file_is_wal_and_versioned(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "troupe.db")
    await store.open()
    try:
        await store.ledger_append([entry()])
        with sqlite3.connect(tmp_path / "troupe.db") as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert conn.execute(
                "SELECT component, version FROM schema_version ORDER BY component"
            ).fetchall() == [("adapters", 1), ("api_keys", 1), ("batch", 1),
                             ("credentials", 1), ("idempotency", 1), ("ledger", 5)]
    finally:
        await store.close()


# --- admin-set credentials ----------------------------------------------------------------


async def test_credentials_put_replace_list_delete_and_survive_reopen(
    make_store: StoreFactory,
) -> None:
    from serve_app.store import CredentialRow

    first = make_store()
    await first.open()
    assert await first.credential_list() == []
    await first.credential_put(CredentialRow("openai", "sk-one", "fp1", 10.0))
    await first.credential_put(CredentialRow("anthropic", "ak-one", "fp2", 11.0))
    await first.credential_put(CredentialRow("openai", "sk-two", "fp3", 12.5))
    rows = await first.credential_list()
    assert [(r.name, r.secret, r.fingerprint, r.updated_at) for r in rows] == [
        ("anthropic", "ak-one", "fp2", 11.0), ("openai", "sk-two", "fp3", 12.5)]
    assert "sk-two" not in repr(rows)  # the secret never prints
    await first.close()
    second = make_store()
    await second.open()
    assert [r.secret for r in await second.credential_list()] == ["ak-one", "sk-two"]
    assert await second.credential_delete("anthropic") is True
    assert await second.credential_delete("anthropic") is False
    assert [r.name for r in await second.credential_list()] == ["openai"]


# --- API keys ------------------------------------------------------------------------------


def _key(key_id: str, **fields: object) -> ApiKeyRow:
    fields.setdefault("name", f"name of {key_id}")
    fields.setdefault("secret_hash", "ab" * 32)
    fields.setdefault("role", "workspace")
    return ApiKeyRow(key_id=key_id, **fields)  # type: ignore[arg-type]


async def test_keys_round_trip_and_revoke(make_store: StoreFactory) -> None:
    store = make_store()
    await store.open()
    scoped = _key("k2", role="models", models=("m-a", "org/m-b"), created_at=20.0,
                  limits={"requests_per_minute": 5}, expires_at=1e10)
    await store.key_create(_key("k1", role="admin", created_at=10.0))
    await store.key_create(scoped)
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        await store.key_create(_key("k1"))
    with pytest.raises(ValueError):
        await store.key_create(_key("k3", role="superuser"))
    keys = await store.key_list()
    assert [k.key_id for k in keys] == ["k1", "k2"]
    assert keys[1] == scoped
    assert await store.key_revoke("k2", 30.0) is True
    assert await store.key_revoke("k2", 40.0) is False  # already revoked: first time kept
    assert await store.key_revoke("nope", 40.0) is False
    other = make_store()  # another replica sees the revocation
    await other.open()
    assert [k.revoked_at for k in await other.key_list()] == [None, 30.0]


# --- idempotency ---------------------------------------------------------------------------


async def test_idempotency_claim_complete_replay(make_store: StoreFactory) -> None:
    first, second = make_store(), make_store()  # two gateway replicas
    await first.open()
    await second.open()
    assert await first.idempotency_claim("k1:abc", "fp1", now=100.0, lock_until=160.0) is None
    running = await second.idempotency_claim("k1:abc", "fp1", now=101.0, lock_until=161.0)
    assert running is not None and running.state == "running" and running.status is None
    body = b'{"ok": true}\x00\xff'
    await first.idempotency_complete("k1:abc", "fp1", 200, [("content-type", "application/json")],
                                     body, expires_at=1000.0)
    done = await second.idempotency_claim("k1:abc", "fp2", now=102.0, lock_until=162.0)
    assert done is not None
    assert (done.state, done.status, done.fingerprint, done.body) == ("done", 200, "fp1", body)
    assert done.headers == (("content-type", "application/json"),)
    # Expired: the next claim takes it over.
    assert await second.idempotency_claim("k1:abc", "fp3", now=1000.0, lock_until=1060.0) is None
    assert (await first.idempotency_claim("k1:abc", "fp3", 1001.0, 1061.0)).fingerprint == "fp3"


async def test_idempotency_concurrent_claims_have_one_winner(store: Store) -> None:
    results = await asyncio.gather(*(
        store.idempotency_claim("race", f"fp{i}", now=5.0, lock_until=50.0) for i in range(20)))
    assert sum(r is None for r in results) == 1


async def test_idempotency_release_unavailable_and_purge(store: Store) -> None:
    assert await store.idempotency_claim("a", "fp", 1.0, 10.0) is None
    await store.idempotency_release("a", "fp")
    assert await store.idempotency_claim("a", "fp", 2.0, 10.0) is None  # claimable again
    await store.idempotency_complete("a", "fp", 200, [], None, expires_at=20.0)
    big = await store.idempotency_claim("a", "fp", 3.0, 10.0)
    assert big is not None and big.state == "unavailable" and big.body is None
    assert await store.idempotency_claim("b", "fp", 3.0, 30.0) is None
    assert await store.idempotency_purge(25.0) == 1  # "a" expired at 20, "b" lives to 30
    assert (await store.idempotency_claim("b", "x", 26.0, 60.0)).state == "running"


# --- batch jobs ----------------------------------------------------------------------------


def _job(job_id: str, webhook: str | None = None) -> BatchJobRow:
    return BatchJobRow(job_id=job_id, key_id="k1", model="m", status="queued",
                       params={"max_tokens": 4}, webhook_url=webhook, created_at=1.0)


def _items(job_id: str, n: int) -> list[BatchItemRow]:
    return [BatchItemRow(job_id=job_id, item_id=f"r{i}", position=i,
                         request={"prompt": f"p{i}"}) for i in range(n)]


async def test_batch_lifecycle_and_exactly_one_result(make_store: StoreFactory) -> None:
    a, b = make_store(), make_store()  # two workers (gateway replicas)
    await a.open()
    await b.open()
    await a.batch_create(_job("j1", "https://hooks.example/x"), _items("j1", 5))
    job = await b.batch_get("j1")
    assert job is not None and job.status == "queued" and job.counts == {"pending": 5}
    assert job.params == {"max_tokens": 4} and job.webhook_url == "https://hooks.example/x"
    assert await a.batch_get("nope") is None

    first = await a.batch_claim("wa", now=10.0, lease_until=20.0, limit=3)
    second = await b.batch_claim("wb", now=10.0, lease_until=20.0, limit=3)
    assert [i.item_id for i in first] == ["r0", "r1", "r2"]
    assert [i.item_id for i in second] == ["r3", "r4"]
    assert all(i.state == "running" and i.attempts == 1 for i in first + second)
    assert (await a.batch_get("j1")).status == "running"
    assert await a.batch_claim("wa", 11.0, 21.0, 10) == []  # nothing left, leases live

    for item in first:
        assert await a.batch_item_done("j1", item.item_id, "wa", "succeeded", {"text": item.item_id})
    assert await a.batch_complete_if_done("j1", 12.0) is False  # wb still holds two
    # wb "dies": its leases run out and wa takes the items over.
    retaken = await a.batch_claim("wa", now=20.0, lease_until=30.0, limit=10)
    assert [(i.item_id, i.attempts) for i in retaken] == [("r3", 2), ("r4", 2)]
    assert await b.batch_item_done("j1", "r3", "wb", "succeeded", {"text": "late"}) is False
    for item in retaken:
        assert await a.batch_item_done("j1", item.item_id, "wa", "failed", {"error": "x"})
    assert await a.batch_complete_if_done("j1", 21.0) is True
    assert await b.batch_complete_if_done("j1", 21.0) is False  # only once
    done = await b.batch_get("j1")
    assert (done.status, done.completed_at, done.webhook_state) == ("completed", 21.0, "pending")
    assert done.counts == {"succeeded": 3, "failed": 2}
    results = await b.batch_items("j1")
    assert [i.result for i in results] == [{"text": "r0"}, {"text": "r1"}, {"text": "r2"},
                                          {"error": "x"}, {"error": "x"}]

    due = await a.batch_webhooks_due(now=22.0, lease_until=40.0, limit=5)
    assert [j.job_id for j in due] == ["j1"]
    assert await b.batch_webhooks_due(now=23.0, lease_until=40.0, limit=5) == []  # leased
    await a.batch_webhook_update("j1", "pending", 1, 50.0, "HTTP 500")
    assert await b.batch_webhooks_due(now=45.0, lease_until=60.0, limit=5) == []  # backoff
    assert [j.webhook_attempts for j in await b.batch_webhooks_due(50.0, 60.0, 5)] == [1]
    await b.batch_webhook_update("j1", "delivered", 2, 0.0, None)
    assert (await a.batch_get("j1")).webhook_state == "delivered"


async def test_batch_without_webhook_and_concurrent_claims(store: Store) -> None:
    await store.batch_create(_job("j2"), _items("j2", 30))
    claims = await asyncio.gather(*(store.batch_claim(f"w{i}", 1.0, 9.0, 4) for i in range(10)))
    ids = [i.item_id for c in claims for i in c]
    assert len(ids) == len(set(ids)) == 30  # every item claimed once
    for worker, items in zip(range(10), claims):
        for item in items:
            assert await store.batch_item_done("j2", item.item_id, f"w{worker}", "succeeded", {})
    assert await store.batch_complete_if_done("j2", 2.0)
    assert (await store.batch_get("j2")).webhook_state == "none"

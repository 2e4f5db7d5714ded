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
            ).fetchall() == [("credentials", 1), ("ledger", 2)]
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

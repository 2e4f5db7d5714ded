"""SQLite store: the default, single-node backend (stdlib ``sqlite3`` in one worker thread).

One connection lives in one dedicated worker thread, so every call runs in submission
order and the asyncio loop never blocks on disk. Several processes on the head node (the
gateway, the metrics actor) may open the same file: WAL mode lets readers run beside the
single writer, and writers wait up to ``busy_timeout`` for each other.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from serve_app.protocol.metrics import LedgerEntry
from serve_app.store.adapter_tables import SQLITE_ADAPTER_MIGRATIONS, SQLiteAdapterTables
from serve_app.store.batch_tables import SQLITE_BATCH_MIGRATIONS, SQLiteBatchTables
from serve_app.store.policy_sqlite import POLICY_MIGRATIONS, SQLitePolicyTables
from serve_app.store.rows import (
    LEDGER_COLUMNS,
    LEDGER_TOTALS_SQL,
    CredentialRow,
    LedgerTotalsRow,
    entry_to_row,
    row_to_entry,
)

__all__ = ["MIN_SQLITE_VERSION", "SQLiteStore"]

T = TypeVar("T")

# STRICT tables (type-checked columns, like PostgreSQL) need SQLite 3.37 (2021-11).
MIN_SQLITE_VERSION = (3, 37, 0)
BUSY_TIMEOUT_MS = 5000

_COLUMN_LIST = ", ".join(LEDGER_COLUMNS)

# Per component, the ordered migration steps; a component's version is how many have run.
# Plain CREATE (no IF NOT EXISTS): a step that ran twice would fail loudly.
_MIGRATIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "ledger": (
        (
            """
            CREATE TABLE ledger (
                event_id          TEXT    NOT NULL PRIMARY KEY,
                ts                REAL    NOT NULL,
                model             TEXT    NOT NULL,
                route             TEXT    NOT NULL,
                provider          TEXT    NOT NULL,
                key_id            TEXT    NOT NULL,
                tier              TEXT    NOT NULL,
                status            INTEGER NOT NULL,
                error_code        TEXT,
                finish_reason     TEXT,
                stream            INTEGER NOT NULL,
                prompt_tokens     INTEGER NOT NULL,
                completion_tokens INTEGER NOT NULL,
                usage_estimated   INTEGER NOT NULL,
                queue_ms          REAL,
                ttft_ms           REAL,
                e2e_ms            REAL    NOT NULL,
                inter_token_ms    TEXT    NOT NULL,  -- JSON array of floats
                replica_busy_s    REAL,
                cost_usd          REAL    NOT NULL,
                cost_estimated    INTEGER NOT NULL,
                price_source      TEXT    NOT NULL
            ) STRICT
            """,
            "CREATE INDEX ledger_ts ON ledger (ts)",
        ),
        # v2: requests that waited for their replica to start (scale from zero).
        ("ALTER TABLE ledger ADD COLUMN cold_start INTEGER NOT NULL DEFAULT 0",),
        # v3: time the request waited for its LoRA adapter to load (issue 19).
        ("ALTER TABLE ledger ADD COLUMN adapter_load_ms REAL",),
        # v4: prompt tokens a remote provider served from its prompt cache (issue 16).
        ("ALTER TABLE ledger ADD COLUMN cached_tokens INTEGER NOT NULL DEFAULT 0",),
        # v5: a realtime response's audio seconds in and out and time to first audio (issue 18).
        ("ALTER TABLE ledger ADD COLUMN audio_in_s REAL",
         "ALTER TABLE ledger ADD COLUMN audio_out_s REAL",
         "ALTER TABLE ledger ADD COLUMN ttfa_ms REAL"),
    ),
    "credentials": (
        (
            """
            CREATE TABLE credentials (
                name        TEXT NOT NULL PRIMARY KEY,
                secret      TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                updated_at  REAL NOT NULL
            ) STRICT
            """,
        ),
    ),
}

_MIGRATIONS.update(POLICY_MIGRATIONS)  # API keys, idempotency records
_MIGRATIONS.update(SQLITE_BATCH_MIGRATIONS)  # batch jobs
_MIGRATIONS.update(SQLITE_ADAPTER_MIGRATIONS)  # LoRA adapters registered at run time

_INSERT_SQL = (
    f"INSERT INTO ledger ({_COLUMN_LIST}) VALUES ({', '.join('?' * len(LEDGER_COLUMNS))}) "
    "ON CONFLICT (event_id) DO NOTHING"
)
_WINDOW_SQL = (
    f"SELECT {_COLUMN_LIST} FROM ledger WHERE ts >= ? AND ts < ? ORDER BY ts, event_id"
)


class SQLiteStore(SQLitePolicyTables, SQLiteBatchTables, SQLiteAdapterTables):
    """The :class:`~serve_app.store.base.Store` on one SQLite file.

    Durability: WAL journal with ``synchronous=FULL``. In WAL mode, NORMAL skips the fsync
    at each commit, so a power loss or OS crash can drop the last commits *after* the call
    returned; the metrics actor drops a batch once ``ledger_append`` returns, so that would
    lose billed requests for good. FULL costs one WAL fsync per commit, and commits are
    per batch (not per request), so the price is small. Readers never wait on it (WAL).

    Cancelling a caller does not cancel its statement: the worker thread finishes it (the
    transaction commits or rolls back as a whole), only the result is dropped.

    Args:
        path: the database file (``":memory:"`` for a private in-memory database); its
            directory is created by :meth:`open`, not here.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        raw = os.fspath(path)
        self.path = raw if raw == ":memory:" else os.path.abspath(raw)
        self.url = f"sqlite://{self.path}" if raw != ":memory:" else "sqlite://:memory:"
        self._conn: sqlite3.Connection | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lifecycle = asyncio.Lock()
        #: FULL (the default) fsyncs every commit. The gateway's policy store sets NORMAL:
        #: idempotency records are written twice per request, and WAL + NORMAL still
        #: survives a process crash (only an OS crash or power loss may drop the last few).
        self.synchronous = "FULL"

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    async def open(self) -> None:
        """Create the directory, connect, and create/migrate tables (idempotent)."""
        async with self._lifecycle:
            if self._conn is not None:
                return
            executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="troupe-sqlite")
            try:
                conn = await asyncio.get_running_loop().run_in_executor(executor, self._connect)
            except BaseException:
                executor.shutdown(wait=False)
                raise
            self._conn, self._executor = conn, executor

    async def close(self) -> None:
        """Close the connection and stop the worker thread (idempotent)."""
        async with self._lifecycle:
            conn, executor = self._conn, self._executor
            if conn is None or executor is None:
                return
            self._conn = self._executor = None
            try:
                # Queued behind any statement still running, so that one finishes first.
                await asyncio.get_running_loop().run_in_executor(executor, conn.close)
            finally:
                executor.shutdown(wait=False)

    async def ledger_append(self, entries: Sequence[LedgerEntry]) -> int:
        """Insert ``entries`` in one transaction, skipping known event ids; returns rows added."""
        rows = [entry_to_row(entry) for entry in entries]  # bad input fails before any write
        if not rows:
            return 0
        return await self._run(_append_rows, rows)

    async def ledger_totals(self) -> list[LedgerTotalsRow]:
        """Totals per (model, provider, route, key_id, tier, status, error_code), ordered by it."""
        rows = await self._run(_fetch_all, LEDGER_TOTALS_SQL, ())
        return [LedgerTotalsRow.from_row(row) for row in rows]

    async def ledger_window(self, start_ts: float, end_ts: float) -> list[LedgerEntry]:
        """Entries with ``start_ts <= ts < end_ts``, oldest first (ties by event id)."""
        rows = await self._run(_fetch_all, _WINDOW_SQL, (float(start_ts), float(end_ts)))
        return [row_to_entry(row) for row in rows]

    async def ledger_count(self) -> int:
        """Number of ledger entries."""
        rows = await self._run(_fetch_all, "SELECT COUNT(*) FROM ledger", ())
        return int(rows[0][0])

    async def credential_put(self, row: CredentialRow) -> None:
        """Insert or replace one admin-set credential (one committed transaction)."""
        await self._run(_put_credential, (row.name, row.secret, row.fingerprint,
                                          float(row.updated_at)))

    async def credential_list(self) -> list[CredentialRow]:
        """Every admin-set credential, ordered by name."""
        rows = await self._run(
            _fetch_all,
            "SELECT name, secret, fingerprint, updated_at FROM credentials ORDER BY name", (),
        )
        return [CredentialRow(r[0], r[1], r[2], float(r[3])) for r in rows]

    async def credential_delete(self, name: str) -> bool:
        """Forget one admin-set credential; False when there was none."""
        return await self._run(_delete_credential, name)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        conn, executor = self._conn, self._executor
        if conn is None or executor is None:
            raise RuntimeError(f"{self!r} is not open; call open() first")
        return await asyncio.get_running_loop().run_in_executor(executor, fn, conn, *args)

    def _connect(self) -> sqlite3.Connection:
        """Worker thread: open the file with the pragmas above and migrate the schema."""
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise RuntimeError(
                f"SQLite {sqlite3.sqlite_version} is too old for the Troupe store "
                f"(needs {'.'.join(map(str, MIN_SQLITE_VERSION))}+)"
            )
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE) below.
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            _migrate(conn)
            if self.path != ":memory:":
                # The file holds admin-set provider keys: readable by the service user only.
                os.chmod(self.path, 0o600)
        except BaseException:
            conn.close()
            raise
        return conn


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE (take the write lock up front: no lock upgrade, no deadlock) … COMMIT."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring every component to its newest version, in one transaction."""
    with _write_transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " component TEXT NOT NULL PRIMARY KEY, version INTEGER NOT NULL) STRICT"
        )
        for component, steps in _MIGRATIONS.items():
            found = conn.execute(
                "SELECT version FROM schema_version WHERE component = ?", (component,)
            ).fetchone()
            current = found[0] if found else 0
            if current > len(steps):
                raise RuntimeError(
                    f"store schema for {component!r} is version {current}, newer than this "
                    f"code knows ({len(steps)}); upgrade Troupe"
                )
            for step in steps[current:]:
                for statement in step:
                    conn.execute(statement)
            if current < len(steps):
                conn.execute(
                    "INSERT INTO schema_version (component, version) VALUES (?, ?) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (component, len(steps)),
                )


def _append_rows(conn: sqlite3.Connection, rows: list[tuple[Any, ...]]) -> int:
    before = conn.total_changes
    with _write_transaction(conn):
        conn.executemany(_INSERT_SQL, rows)
    return conn.total_changes - before


def _fetch_all(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def _put_credential(conn: sqlite3.Connection, row: tuple[Any, ...]) -> None:
    with _write_transaction(conn):
        conn.execute(
            "INSERT INTO credentials (name, secret, fingerprint, updated_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (name) DO UPDATE SET secret = excluded.secret, "
            "fingerprint = excluded.fingerprint, updated_at = excluded.updated_at",
            row,
        )


def _delete_credential(conn: sqlite3.Connection, name: str) -> bool:
    with _write_transaction(conn):
        cursor = conn.execute("DELETE FROM credentials WHERE name = ?", (name,))
    return cursor.rowcount > 0

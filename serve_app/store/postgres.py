"""PostgreSQL store: the cluster backend (``asyncpg`` with a connection pool).

Same tables and the same results as :mod:`serve_app.store.sqlite`: text columns use
``COLLATE "C"`` so ordering is bytewise as in SQLite, floats are ``DOUBLE PRECISION`` (the
same IEEE doubles SQLite stores), and rows go through the shared converters of
:mod:`serve_app.store.rows`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from serve_app.protocol.metrics import LedgerEntry
from serve_app.store.adapter_tables import POSTGRES_ADAPTER_MIGRATIONS, PostgresAdapterTables
from serve_app.store.batch_tables import POSTGRES_BATCH_MIGRATIONS, PostgresBatchTables
from serve_app.store.policy_postgres import POLICY_MIGRATIONS, PostgresPolicyTables
from serve_app.store.rows import (
    LEDGER_COLUMNS,
    LEDGER_TOTALS_SQL,
    CredentialRow,
    LedgerTotalsRow,
    entry_to_row,
    row_to_entry,
)

__all__ = ["PostgresStore"]

# Serialises schema migrations between processes opening the same database at once.
_MIGRATION_LOCK_KEY = 0x7472_6F75_7065  # "troupe"

# PostgreSQL array type per ledger column, for the one-statement batch insert below.
_COLUMN_TYPES: dict[str, str] = {
    "event_id": "text", "ts": "float8", "model": "text", "route": "text",
    "provider": "text", "key_id": "text", "tier": "text", "status": "int4",
    "error_code": "text", "finish_reason": "text", "stream": "bool",
    "prompt_tokens": "int8", "completion_tokens": "int8", "usage_estimated": "bool",
    "queue_ms": "float8", "ttft_ms": "float8", "e2e_ms": "float8",
    "inter_token_ms": "text", "replica_busy_s": "float8", "cold_start": "bool",
    "adapter_load_ms": "float8", "cached_tokens": "int8", "audio_in_s": "float8", "audio_out_s": "float8",
    "ttfa_ms": "float8",
    "cost_usd": "float8", "cost_estimated": "bool", "price_source": "text",
}
assert tuple(_COLUMN_TYPES) == LEDGER_COLUMNS

_MIGRATIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "ledger": (
        (
            """
            CREATE TABLE ledger (
                event_id          TEXT COLLATE "C" PRIMARY KEY,
                ts                DOUBLE PRECISION NOT NULL,
                model             TEXT COLLATE "C" NOT NULL,
                route             TEXT COLLATE "C" NOT NULL,
                provider          TEXT COLLATE "C" NOT NULL,
                key_id            TEXT COLLATE "C" NOT NULL,
                tier              TEXT COLLATE "C" NOT NULL,
                status            INTEGER NOT NULL,
                error_code        TEXT COLLATE "C",
                finish_reason     TEXT COLLATE "C",
                stream            BOOLEAN NOT NULL,
                prompt_tokens     BIGINT NOT NULL,
                completion_tokens BIGINT NOT NULL,
                usage_estimated   BOOLEAN NOT NULL,
                queue_ms          DOUBLE PRECISION,
                ttft_ms           DOUBLE PRECISION,
                e2e_ms            DOUBLE PRECISION NOT NULL,
                inter_token_ms    JSONB NOT NULL,
                replica_busy_s    DOUBLE PRECISION,
                cost_usd          DOUBLE PRECISION NOT NULL,
                cost_estimated    BOOLEAN NOT NULL,
                price_source      TEXT COLLATE "C" NOT NULL
            )
            """,
            "CREATE INDEX ledger_ts ON ledger (ts)",
        ),
        # v2: requests that waited for their replica to start (scale from zero).
        ("ALTER TABLE ledger ADD COLUMN cold_start BOOLEAN NOT NULL DEFAULT false",),
        # v3: time the request waited for its LoRA adapter to load (issue 19).
        ("ALTER TABLE ledger ADD COLUMN adapter_load_ms DOUBLE PRECISION",),
        # v4: prompt tokens a remote provider served from its prompt cache (issue 16).
        ("ALTER TABLE ledger ADD COLUMN cached_tokens BIGINT NOT NULL DEFAULT 0",),
        # v5: a realtime response's audio seconds in and out and time to first audio (issue 18).
        ("ALTER TABLE ledger ADD COLUMN audio_in_s DOUBLE PRECISION",
         "ALTER TABLE ledger ADD COLUMN audio_out_s DOUBLE PRECISION",
         "ALTER TABLE ledger ADD COLUMN ttfa_ms DOUBLE PRECISION"),
    ),
    "credentials": (
        (
            """
            CREATE TABLE credentials (
                name        TEXT COLLATE "C" PRIMARY KEY,
                secret      TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                updated_at  DOUBLE PRECISION NOT NULL
            )
            """,
        ),
    ),
}

_MIGRATIONS.update(POLICY_MIGRATIONS)  # API keys, idempotency records
_MIGRATIONS.update(POSTGRES_BATCH_MIGRATIONS)  # batch jobs
_MIGRATIONS.update(POSTGRES_ADAPTER_MIGRATIONS)  # LoRA adapters registered at run time

_COLUMN_LIST = ", ".join(LEDGER_COLUMNS)
# One statement per batch: the columns arrive as arrays and are zipped back into rows by
# unnest, kept in batch order (so the first of two equal event ids wins, as in SQLite);
# the CTE counts the rows that were really inserted.
_INSERT_SQL = f"""
WITH inserted AS (
    INSERT INTO ledger ({_COLUMN_LIST})
    SELECT {", ".join("t.inter_token_ms::jsonb" if c == "inter_token_ms" else f"t.{c}"
                      for c in LEDGER_COLUMNS)}
    FROM unnest({", ".join(f"${i}::{_COLUMN_TYPES[c]}[]"
                           for i, c in enumerate(LEDGER_COLUMNS, start=1))})
         WITH ORDINALITY AS t({_COLUMN_LIST}, position)
    ORDER BY t.position
    ON CONFLICT (event_id) DO NOTHING
    RETURNING 1
)
SELECT COUNT(*) FROM inserted
"""
_WINDOW_SQL = (
    f"SELECT {', '.join(f'{c}::text' if c == 'inter_token_ms' else c for c in LEDGER_COLUMNS)} "
    "FROM ledger WHERE ts >= $1 AND ts < $2 ORDER BY ts, event_id"
)


class PostgresStore(PostgresPolicyTables, PostgresBatchTables, PostgresAdapterTables):
    """The :class:`~serve_app.store.base.Store` on a PostgreSQL database.

    Every call borrows a pooled connection; a batch append is one statement, so it is
    atomic and durable (committed) when it returns.

    Args:
        url: ``postgresql://user[:password]@host:port/database`` (asyncpg DSN syntax).
        min_size: connections the pool keeps open.
        max_size: most connections the pool opens; further callers wait for one.
    """

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10) -> None:
        self.url = url
        self._min_size = min_size
        self._max_size = max_size
        self._pool: asyncpg.Pool | None = None
        self._lifecycle = asyncio.Lock()

    def __repr__(self) -> str:
        return f"PostgresStore({_redact(self.url)!r})"

    async def open(self) -> None:
        """Create the pool and create/migrate tables (idempotent)."""
        async with self._lifecycle:
            if self._pool is not None:
                return
            pool = await asyncpg.create_pool(
                self.url, min_size=self._min_size, max_size=self._max_size
            )
            try:
                async with pool.acquire() as conn:
                    await _migrate(conn)
            except BaseException:
                await pool.close()
                raise
            self._pool = pool

    async def close(self) -> None:
        """Close the pool, waiting for borrowed connections to come back (idempotent)."""
        async with self._lifecycle:
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.close()

    async def ledger_append(self, entries: Sequence[LedgerEntry]) -> int:
        """Insert ``entries`` in one statement, skipping known event ids; returns rows added."""
        rows = [entry_to_row(entry) for entry in entries]  # bad input fails before any write
        if not rows:
            return 0
        columns = [list(values) for values in zip(*rows)]
        return int(await self._require_pool().fetchval(_INSERT_SQL, *columns))

    async def ledger_totals(self) -> list[LedgerTotalsRow]:
        """Totals per (model, provider, route, key_id, tier, status, error_code), ordered by it."""
        rows = await self._require_pool().fetch(LEDGER_TOTALS_SQL)
        return [LedgerTotalsRow.from_row(tuple(row)) for row in rows]

    async def ledger_window(self, start_ts: float, end_ts: float) -> list[LedgerEntry]:
        """Entries with ``start_ts <= ts < end_ts``, oldest first (ties by event id)."""
        rows = await self._require_pool().fetch(_WINDOW_SQL, float(start_ts), float(end_ts))
        return [row_to_entry(tuple(row)) for row in rows]

    async def ledger_count(self) -> int:
        """Number of ledger entries."""
        return int(await self._require_pool().fetchval("SELECT COUNT(*) FROM ledger"))

    async def credential_put(self, row: CredentialRow) -> None:
        """Insert or replace one admin-set credential."""
        await self._require_pool().execute(
            "INSERT INTO credentials (name, secret, fingerprint, updated_at) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT (name) DO UPDATE SET "
            "secret = excluded.secret, fingerprint = excluded.fingerprint, "
            "updated_at = excluded.updated_at",
            row.name, row.secret, row.fingerprint, float(row.updated_at),
        )

    async def credential_list(self) -> list[CredentialRow]:
        """Every admin-set credential, ordered by name."""
        rows = await self._require_pool().fetch(
            "SELECT name, secret, fingerprint, updated_at FROM credentials ORDER BY name"
        )
        return [CredentialRow(r[0], r[1], r[2], float(r[3])) for r in rows]

    async def credential_delete(self, name: str) -> bool:
        """Forget one admin-set credential; False when there was none."""
        status = await self._require_pool().execute(
            "DELETE FROM credentials WHERE name = $1", name
        )
        return status.split()[-1] != "0"

    def _require_pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError(f"{self!r} is not open; call open() first")
        return self._pool


async def _migrate(conn: Any) -> None:
    """Bring every component to its newest version, in one transaction."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK_KEY)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        for component, steps in _MIGRATIONS.items():
            current = await conn.fetchval(
                "SELECT version FROM schema_version WHERE component = $1", component
            ) or 0
            if current > len(steps):
                raise RuntimeError(
                    f"store schema for {component!r} is version {current}, newer than this "
                    f"code knows ({len(steps)}); upgrade Troupe"
                )
            for step in steps[current:]:
                for statement in step:
                    await conn.execute(statement)
            if current < len(steps):
                await conn.execute(
                    "INSERT INTO schema_version (component, version) VALUES ($1, $2) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    component, len(steps),
                )


def _redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (for logs and reprs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))

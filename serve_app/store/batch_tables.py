"""Batch jobs in the store: one implementation for SQLite and PostgreSQL.

Statements are written once with ``?`` placeholders (PostgreSQL gets ``$n``). Items are
claimed with a lease: a worker that dies leaves its items to be claimed again when the
lease ends, and a result is recorded only by the worker that holds the item, so each
item gets exactly one result.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from typing import Any, Optional

from serve_app.store.policy_rows import (
    BATCH_ITEM_COLUMNS,
    BATCH_JOB_COLUMNS,
    BatchItemRow,
    BatchJobRow,
    item_to_row,
    job_to_row,
    row_to_item,
    row_to_job,
)

__all__ = ["SQLITE_BATCH_MIGRATIONS", "POSTGRES_BATCH_MIGRATIONS", "SQLiteBatchTables",
           "PostgresBatchTables"]

_DDL = """
CREATE TABLE batch_jobs (
    job_id TEXT {id} NOT NULL PRIMARY KEY, key_id TEXT NOT NULL, model TEXT NOT NULL,
    status TEXT NOT NULL, params TEXT NOT NULL, webhook_url TEXT, created_at {real} NOT NULL,
    completed_at {real}, webhook_state TEXT NOT NULL, webhook_attempts INTEGER NOT NULL,
    webhook_next_at {real} NOT NULL, webhook_lease_until {real} NOT NULL, webhook_error TEXT
){strict}
|
CREATE TABLE batch_items (
    job_id TEXT {id} NOT NULL, item_id TEXT {id} NOT NULL, position INTEGER NOT NULL,
    request TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL,
    lease_until {real} NOT NULL, worker TEXT, result TEXT, PRIMARY KEY (job_id, item_id)
){strict}
|
CREATE INDEX batch_items_state ON batch_items (state, lease_until)
"""
SQLITE_BATCH_MIGRATIONS = {"batch": (tuple(
    s.strip() for s in _DDL.format(id="", real="REAL", strict=" STRICT").split("|")),)}
POSTGRES_BATCH_MIGRATIONS = {"batch": (tuple(
    s.strip() for s in _DDL.format(id='COLLATE "C"', real="DOUBLE PRECISION", strict="").split("|")),)}

_JOBS = ", ".join(BATCH_JOB_COLUMNS)
_ITEMS = ", ".join(BATCH_ITEM_COLUMNS)
INSERT_JOB = f"INSERT INTO batch_jobs ({_JOBS}) VALUES ({', '.join('?' * len(BATCH_JOB_COLUMNS))})"
INSERT_ITEM = f"INSERT INTO batch_items ({_ITEMS}) VALUES ({', '.join('?' * len(BATCH_ITEM_COLUMNS))})"
GET_JOB = f"SELECT {_JOBS} FROM batch_jobs WHERE job_id = ?"
COUNTS = "SELECT state, COUNT(*) FROM batch_items WHERE job_id = ? GROUP BY state"
ITEMS = f"SELECT {_ITEMS} FROM batch_items WHERE job_id = ? ORDER BY position"
CLAIMABLE = (
    "SELECT job_id, item_id FROM batch_items WHERE state = 'pending' OR "
    "(state = 'running' AND lease_until <= ?) ORDER BY job_id, position LIMIT ?"
)
CLAIM_ONE = (
    "UPDATE batch_items SET state = 'running', attempts = attempts + 1, lease_until = ?, "
    "worker = ? WHERE job_id = ? AND item_id = ?"
)
CLAIMED = f"SELECT {_ITEMS} FROM batch_items WHERE worker = ? AND state = 'running' AND lease_until = ?"
JOB_RUNNING = "UPDATE batch_jobs SET status = 'running' WHERE job_id = ? AND status = 'queued'"
ITEM_DONE = (
    "UPDATE batch_items SET state = ?, result = ?, lease_until = 0 "
    "WHERE job_id = ? AND item_id = ? AND state = 'running' AND worker = ?"
)
COMPLETE_IF_DONE = (
    "UPDATE batch_jobs SET status = 'completed', completed_at = ?, webhook_state = "
    "CASE WHEN webhook_url IS NULL THEN 'none' ELSE 'pending' END "
    "WHERE job_id = ? AND status <> 'completed' AND NOT EXISTS (SELECT 1 FROM batch_items "
    "WHERE job_id = ? AND state IN ('pending', 'running'))"
)
WEBHOOKS_DUE = (
    "SELECT job_id FROM batch_jobs WHERE webhook_state = 'pending' AND webhook_next_at <= ? "
    "AND webhook_lease_until <= ? ORDER BY completed_at LIMIT ?"
)
WEBHOOK_LEASE = "UPDATE batch_jobs SET webhook_lease_until = ? WHERE job_id = ?"
WEBHOOK_UPDATE = (
    "UPDATE batch_jobs SET webhook_state = ?, webhook_attempts = ?, webhook_next_at = ?, "
    "webhook_lease_until = 0, webhook_error = ? WHERE job_id = ?"
)


def _pg(sql: str) -> str:
    counter = iter(range(1, 1000))
    return re.sub(r"\?", lambda _m: f"${next(counter)}", sql)


class SQLiteBatchTables:
    """Batch methods of the Store protocol for SQLiteStore."""

    async def _run(self, fn: Any, *args: Any) -> Any:  # provided by SQLiteStore
        raise NotImplementedError

    async def batch_create(self, job: BatchJobRow, items: Sequence[BatchItemRow]) -> None:
        """Insert a job and its items, atomically (a duplicate id raises)."""
        def run(conn: sqlite3.Connection) -> None:
            with _tx(conn):
                conn.execute(INSERT_JOB, job_to_row(job))
                conn.executemany(INSERT_ITEM, [item_to_row(i) for i in items])
        await self._run(run)

    async def batch_get(self, job_id: str) -> Optional[BatchJobRow]:
        """The job with ``counts`` per item state, or None."""
        def run(conn: sqlite3.Connection) -> Optional[BatchJobRow]:
            row = conn.execute(GET_JOB, (job_id,)).fetchone()
            if row is None:
                return None
            return row_to_job(row, dict(conn.execute(COUNTS, (job_id,)).fetchall()))
        return await self._run(run)

    async def batch_items(self, job_id: str) -> list[BatchItemRow]:
        """Every item of a job, in submission order."""
        def run(conn: sqlite3.Connection) -> list[BatchItemRow]:
            return [row_to_item(r) for r in conn.execute(ITEMS, (job_id,)).fetchall()]
        return await self._run(run)

    async def batch_claim(self, worker: str, now: float, lease_until: float,
                          limit: int) -> list[BatchItemRow]:
        """Claim up to ``limit`` pending (or lease-expired) items for ``worker``."""
        def run(conn: sqlite3.Connection) -> list[BatchItemRow]:
            with _tx(conn):
                picked = conn.execute(CLAIMABLE, (now, limit)).fetchall()
                for job_id, item_id in picked:
                    conn.execute(CLAIM_ONE, (lease_until, worker, job_id, item_id))
                for job_id in {j for j, _ in picked}:
                    conn.execute(JOB_RUNNING, (job_id,))
                if not picked:
                    return []
                rows = conn.execute(CLAIMED, (worker, lease_until)).fetchall()
            return [row_to_item(r) for r in rows]
        return await self._run(run)

    async def batch_item_done(self, job_id: str, item_id: str, worker: str, state: str,
                              result: dict[str, Any]) -> bool:
        """Record an item's result; False when ``worker`` no longer holds it."""
        import json

        def run(conn: sqlite3.Connection) -> bool:
            with _tx(conn):
                cur = conn.execute(ITEM_DONE, (state, json.dumps(result), job_id, item_id, worker))
            return cur.rowcount == 1
        return await self._run(run)

    async def batch_complete_if_done(self, job_id: str, now: float) -> bool:
        """Mark the job completed when no item is left; True for the one caller that did."""
        def run(conn: sqlite3.Connection) -> bool:
            with _tx(conn):
                cur = conn.execute(COMPLETE_IF_DONE, (now, job_id, job_id))
            return cur.rowcount == 1
        return await self._run(run)

    async def batch_webhooks_due(self, now: float, lease_until: float,
                                 limit: int) -> list[BatchJobRow]:
        """Lease completed jobs whose webhook is due (so one worker sends each)."""
        def run(conn: sqlite3.Connection) -> list[BatchJobRow]:
            with _tx(conn):
                ids = [r[0] for r in conn.execute(WEBHOOKS_DUE, (now, now, limit)).fetchall()]
                for job_id in ids:
                    conn.execute(WEBHOOK_LEASE, (lease_until, job_id))
                return [row_to_job(conn.execute(GET_JOB, (i,)).fetchone()) for i in ids]
        return await self._run(run)

    async def batch_webhook_update(self, job_id: str, state: str, attempts: int,
                                   next_at: float, error: Optional[str]) -> None:
        """Record a delivery attempt (state pending / delivered / failed)."""
        def run(conn: sqlite3.Connection) -> None:
            with _tx(conn):
                conn.execute(WEBHOOK_UPDATE, (state, attempts, next_at, error, job_id))
        await self._run(run)


class _tx:
    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


class PostgresBatchTables:
    """Batch methods of the Store protocol for PostgresStore."""

    def _require_pool(self) -> Any:  # provided by PostgresStore
        raise NotImplementedError

    async def batch_create(self, job: BatchJobRow, items: Sequence[BatchItemRow]) -> None:
        async with self._require_pool().acquire() as conn, conn.transaction():
            await conn.execute(_pg(INSERT_JOB), *job_to_row(job))
            await conn.executemany(_pg(INSERT_ITEM), [item_to_row(i) for i in items])

    async def batch_get(self, job_id: str) -> Optional[BatchJobRow]:
        async with self._require_pool().acquire() as conn:
            row = await conn.fetchrow(_pg(GET_JOB), job_id)
            if row is None:
                return None
            counts = {r[0]: int(r[1]) for r in await conn.fetch(_pg(COUNTS), job_id)}
        return row_to_job(tuple(row), counts)

    async def batch_items(self, job_id: str) -> list[BatchItemRow]:
        rows = await self._require_pool().fetch(_pg(ITEMS), job_id)
        return [row_to_item(tuple(r)) for r in rows]

    async def batch_claim(self, worker: str, now: float, lease_until: float,
                          limit: int) -> list[BatchItemRow]:
        async with self._require_pool().acquire() as conn, conn.transaction():
            picked = await conn.fetch(_pg(CLAIMABLE) + " FOR UPDATE SKIP LOCKED",
                                      float(now), int(limit))
            for job_id, item_id in picked:
                await conn.execute(_pg(CLAIM_ONE), float(lease_until), worker, job_id, item_id)
            for job_id in {r[0] for r in picked}:
                await conn.execute(_pg(JOB_RUNNING), job_id)
            if not picked:
                return []
            rows = await conn.fetch(_pg(CLAIMED), worker, float(lease_until))
        return [row_to_item(tuple(r)) for r in rows]

    async def batch_item_done(self, job_id: str, item_id: str, worker: str, state: str,
                              result: dict[str, Any]) -> bool:
        import json

        status = await self._require_pool().execute(
            _pg(ITEM_DONE), state, json.dumps(result), job_id, item_id, worker)
        return status.endswith(" 1")

    async def batch_complete_if_done(self, job_id: str, now: float) -> bool:
        status = await self._require_pool().execute(
            _pg(COMPLETE_IF_DONE), float(now), job_id, job_id)
        return status.endswith(" 1")

    async def batch_webhooks_due(self, now: float, lease_until: float,
                                 limit: int) -> list[BatchJobRow]:
        async with self._require_pool().acquire() as conn, conn.transaction():
            ids = [r[0] for r in await conn.fetch(
                _pg(WEBHOOKS_DUE) + " FOR UPDATE SKIP LOCKED", float(now), float(now), int(limit))]
            out = []
            for job_id in ids:
                await conn.execute(_pg(WEBHOOK_LEASE), float(lease_until), job_id)
                out.append(row_to_job(tuple(await conn.fetchrow(_pg(GET_JOB), job_id))))
        return out

    async def batch_webhook_update(self, job_id: str, state: str, attempts: int,
                                   next_at: float, error: Optional[str]) -> None:
        await self._require_pool().execute(
            _pg(WEBHOOK_UPDATE), state, int(attempts), float(next_at), error, job_id)

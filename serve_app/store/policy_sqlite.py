"""SQLite side of the policy tables (API keys, idempotency records), mixed into SQLiteStore."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Optional

from serve_app.store.policy_rows import (
    IDEMPOTENCY_COLUMNS,
    KEY_COLUMNS,
    ApiKeyRow,
    IdempotencyRow,
    encode_headers,
    idempotency_from_row,
    key_to_row,
    row_to_key,
)

__all__ = ["POLICY_MIGRATIONS", "SQLitePolicyTables"]

POLICY_MIGRATIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "api_keys": (
        (
            """
            CREATE TABLE api_keys (
                key_id      TEXT NOT NULL PRIMARY KEY,
                name        TEXT NOT NULL,
                secret_hash TEXT NOT NULL,
                role        TEXT NOT NULL,
                models      TEXT NOT NULL,  -- JSON array
                limits      TEXT NOT NULL,  -- JSON object
                created_at  REAL NOT NULL,
                expires_at  REAL,
                revoked_at  REAL
            ) STRICT
            """,
        ),
    ),
    "idempotency": (
        (
            """
            CREATE TABLE idempotency (
                scope       TEXT NOT NULL PRIMARY KEY,
                fingerprint TEXT NOT NULL,
                state       TEXT NOT NULL,
                status      INTEGER,
                headers     TEXT NOT NULL,  -- JSON array of [name, value]
                body        BLOB,
                created_at  REAL NOT NULL,
                expires_at  REAL NOT NULL
            ) STRICT
            """,
            "CREATE INDEX idempotency_expires ON idempotency (expires_at)",
        ),
    ),
}

_KEY_LIST = ", ".join(KEY_COLUMNS)
_IDEM_LIST = ", ".join(IDEMPOTENCY_COLUMNS)


class SQLitePolicyTables:
    """API keys and idempotency records (methods of the Store protocol)."""

    async def _run(self, fn: Any, *args: Any) -> Any:  # provided by SQLiteStore
        raise NotImplementedError

    async def key_create(self, key: ApiKeyRow) -> None:
        """Insert a key; a duplicate ``key_id`` raises."""
        await self._run(_key_create, key_to_row(key))

    async def key_list(self) -> list[ApiKeyRow]:
        """Every key, revoked ones included, oldest first."""
        rows = await self._run(_fetch, f"SELECT {_KEY_LIST} FROM api_keys "
                               "ORDER BY created_at, key_id", ())
        return [row_to_key(r) for r in rows]

    async def key_revoke(self, key_id: str, now: float) -> bool:
        """Mark a key revoked; False when it does not exist or was already revoked."""
        return await self._run(_key_revoke, key_id, float(now))

    async def idempotency_claim(
        self, scope: str, fingerprint: str, now: float, lock_until: float
    ) -> Optional[IdempotencyRow]:
        """Claim ``scope`` for a new request (``running`` until ``lock_until``).

        Returns None when this caller now owns it (no live record existed), else the live
        record (running or done) another request left. Atomic across processes.
        """
        return await self._run(_idem_claim, scope, fingerprint, float(now), float(lock_until))

    async def idempotency_complete(
        self, scope: str, fingerprint: str, status: int,
        headers: Sequence[tuple[str, str]], body: Optional[bytes], expires_at: float,
    ) -> None:
        """Store the first request's response (``body`` None: too large, ``unavailable``)."""
        await self._run(_idem_complete, scope, fingerprint, int(status),
                        encode_headers(headers), body, float(expires_at))

    async def idempotency_release(self, scope: str, fingerprint: str) -> None:
        """Forget a running claim (the request failed and may be retried)."""
        await self._run(_idem_release, scope, fingerprint)

    async def idempotency_purge(self, now: float) -> int:
        """Delete expired records; returns how many."""
        return await self._run(_idem_purge, float(now))


def _write(conn: sqlite3.Connection, fn: Any) -> Any:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = fn()
        conn.execute("COMMIT")
        return result
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _fetch(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[Any]:
    return conn.execute(sql, params).fetchall()


def _key_create(conn: sqlite3.Connection, row: tuple[Any, ...]) -> None:
    _write(conn, lambda: conn.execute(
        f"INSERT INTO api_keys ({_KEY_LIST}) VALUES ({', '.join('?' * len(KEY_COLUMNS))})", row))


def _key_revoke(conn: sqlite3.Connection, key_id: str, now: float) -> bool:
    cur = _write(conn, lambda: conn.execute(
        "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL",
        (now, key_id)))
    return cur.rowcount == 1


def _idem_claim(conn: sqlite3.Connection, scope: str, fingerprint: str, now: float,
                lock_until: float) -> Optional[IdempotencyRow]:
    def claim() -> Optional[IdempotencyRow]:
        row = conn.execute(f"SELECT {_IDEM_LIST} FROM idempotency WHERE scope = ?",
                           (scope,)).fetchone()
        if row is not None and row[-1] > now:
            return idempotency_from_row(row)
        conn.execute(
            f"INSERT INTO idempotency ({_IDEM_LIST}) VALUES (?, ?, 'running', NULL, '[]', NULL, ?, ?) "
            "ON CONFLICT (scope) DO UPDATE SET fingerprint = excluded.fingerprint, "
            "state = 'running', status = NULL, headers = '[]', body = NULL, "
            "created_at = excluded.created_at, expires_at = excluded.expires_at",
            (scope, fingerprint, now, lock_until))
        return None

    return _write(conn, claim)


def _idem_complete(conn: sqlite3.Connection, scope: str, fingerprint: str, status: int,
                   headers: str, body: Optional[bytes], expires_at: float) -> None:
    state = "done" if body is not None else "unavailable"
    _write(conn, lambda: conn.execute(
        "UPDATE idempotency SET state = ?, status = ?, headers = ?, body = ?, expires_at = ? "
        "WHERE scope = ? AND fingerprint = ? AND state = 'running'",
        (state, status, headers, body, expires_at, scope, fingerprint)))


def _idem_release(conn: sqlite3.Connection, scope: str, fingerprint: str) -> None:
    _write(conn, lambda: conn.execute(
        "DELETE FROM idempotency WHERE scope = ? AND fingerprint = ? AND state = 'running'",
        (scope, fingerprint)))


def _idem_purge(conn: sqlite3.Connection, now: float) -> int:
    cur = _write(conn, lambda: conn.execute(
        "DELETE FROM idempotency WHERE expires_at <= ?", (now,)))
    return cur.rowcount

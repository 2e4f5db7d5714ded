"""PostgreSQL side of the policy tables (API keys, idempotency records), mixed into PostgresStore."""

from __future__ import annotations

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

__all__ = ["POLICY_MIGRATIONS", "PostgresPolicyTables"]

POLICY_MIGRATIONS: dict[str, tuple[tuple[str, ...], ...]] = {
    "api_keys": (
        (
            """
            CREATE TABLE api_keys (
                key_id      TEXT COLLATE "C" PRIMARY KEY,
                name        TEXT NOT NULL,
                secret_hash TEXT NOT NULL,
                role        TEXT NOT NULL,
                models      TEXT NOT NULL,
                limits      TEXT NOT NULL,
                created_at  DOUBLE PRECISION NOT NULL,
                expires_at  DOUBLE PRECISION,
                revoked_at  DOUBLE PRECISION
            )
            """,
        ),
    ),
    "idempotency": (
        (
            """
            CREATE TABLE idempotency (
                scope       TEXT COLLATE "C" PRIMARY KEY,
                fingerprint TEXT NOT NULL,
                state       TEXT NOT NULL,
                status      INTEGER,
                headers     TEXT NOT NULL,
                body        BYTEA,
                created_at  DOUBLE PRECISION NOT NULL,
                expires_at  DOUBLE PRECISION NOT NULL
            )
            """,
            "CREATE INDEX idempotency_expires ON idempotency (expires_at)",
        ),
    ),
}

_KEY_LIST = ", ".join(KEY_COLUMNS)
_IDEM_LIST = ", ".join(IDEMPOTENCY_COLUMNS)
# Insert, or take over an expired record; RETURNING says whether this caller won.
_CLAIM_SQL = f"""
INSERT INTO idempotency ({_IDEM_LIST}) VALUES ($1, $2, 'running', NULL, '[]', NULL, $3, $4)
ON CONFLICT (scope) DO UPDATE SET fingerprint = excluded.fingerprint, state = 'running',
    status = NULL, headers = '[]', body = NULL, created_at = excluded.created_at,
    expires_at = excluded.expires_at
WHERE idempotency.expires_at <= $3
RETURNING 1
"""


class PostgresPolicyTables:
    """API keys and idempotency records (methods of the Store protocol)."""

    def _require_pool(self) -> Any:  # provided by PostgresStore
        raise NotImplementedError

    async def key_create(self, key: ApiKeyRow) -> None:
        """Insert a key; a duplicate ``key_id`` raises."""
        params = ", ".join(f"${i}" for i in range(1, len(KEY_COLUMNS) + 1))
        await self._require_pool().execute(
            f"INSERT INTO api_keys ({_KEY_LIST}) VALUES ({params})", *key_to_row(key))

    async def key_list(self) -> list[ApiKeyRow]:
        """Every key, revoked ones included, oldest first."""
        rows = await self._require_pool().fetch(
            f"SELECT {_KEY_LIST} FROM api_keys ORDER BY created_at, key_id")
        return [row_to_key(tuple(r)) for r in rows]

    async def key_revoke(self, key_id: str, now: float) -> bool:
        """Mark a key revoked; False when it does not exist or was already revoked."""
        status = await self._require_pool().execute(
            "UPDATE api_keys SET revoked_at = $1 WHERE key_id = $2 AND revoked_at IS NULL",
            float(now), key_id)
        return status.endswith(" 1")

    async def idempotency_claim(
        self, scope: str, fingerprint: str, now: float, lock_until: float
    ) -> Optional[IdempotencyRow]:
        """See :meth:`SQLitePolicyTables.idempotency_claim`."""
        pool = self._require_pool()
        async with pool.acquire() as conn:
            async with conn.transaction():
                won = await conn.fetchval(_CLAIM_SQL, scope, fingerprint, float(now),
                                          float(lock_until))
                if won:
                    return None
                row = await conn.fetchrow(
                    f"SELECT {_IDEM_LIST} FROM idempotency WHERE scope = $1", scope)
        return idempotency_from_row(tuple(row))

    async def idempotency_complete(
        self, scope: str, fingerprint: str, status: int,
        headers: Sequence[tuple[str, str]], body: Optional[bytes], expires_at: float,
    ) -> None:
        """Store the first request's response (``body`` None: too large, ``unavailable``)."""
        await self._require_pool().execute(
            "UPDATE idempotency SET state = $1, status = $2, headers = $3, body = $4, "
            "expires_at = $5 WHERE scope = $6 AND fingerprint = $7 AND state = 'running'",
            "done" if body is not None else "unavailable", int(status),
            encode_headers(headers), body, float(expires_at), scope, fingerprint)

    async def idempotency_release(self, scope: str, fingerprint: str) -> None:
        """Forget a running claim (the request failed and may be retried)."""
        await self._require_pool().execute(
            "DELETE FROM idempotency WHERE scope = $1 AND fingerprint = $2 AND state = 'running'",
            scope, fingerprint)

    async def idempotency_purge(self, now: float) -> int:
        """Delete expired records; returns how many."""
        status = await self._require_pool().execute(
            "DELETE FROM idempotency WHERE expires_at <= $1", float(now))
        return int(status.rsplit(" ", 1)[-1])

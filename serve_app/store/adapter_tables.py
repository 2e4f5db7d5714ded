"""LoRA adapters registered at run time (``POST /models/{base}/adapters``), in the store.

One row per (base model, adapter id) with the adapter's folder, so a redeploy keeps what an
admin registered. Statements are written once with ``?`` placeholders (PostgreSQL gets
``$n``), like the batch tables.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from typing import Any

__all__ = [
    "AdapterRow",
    "SQLITE_ADAPTER_MIGRATIONS",
    "POSTGRES_ADAPTER_MIGRATIONS",
    "SQLiteAdapterTables",
    "PostgresAdapterTables",
]


@dataclass(frozen=True, slots=True)
class AdapterRow:
    """One registered adapter."""

    base: str
    adapter_id: str
    path: str
    created_at: float


_DDL = (
    "CREATE TABLE adapters (base TEXT {id} NOT NULL, adapter_id TEXT {id} NOT NULL, "
    "path TEXT NOT NULL, created_at {real} NOT NULL, PRIMARY KEY (base, adapter_id)){strict}"
)
SQLITE_ADAPTER_MIGRATIONS = {"adapters": ((_DDL.format(id="", real="REAL", strict=" STRICT"),),)}
POSTGRES_ADAPTER_MIGRATIONS = {
    "adapters": ((_DDL.format(id='COLLATE "C"', real="DOUBLE PRECISION", strict=""),),)
}

_PUT = (
    "INSERT INTO adapters (base, adapter_id, path, created_at) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (base, adapter_id) DO UPDATE SET path = excluded.path, "
    "created_at = excluded.created_at"
)
_LIST = "SELECT base, adapter_id, path, created_at FROM adapters ORDER BY base, adapter_id"
_DELETE = "DELETE FROM adapters WHERE base = ? AND adapter_id = ?"


def _pg(sql: str) -> str:
    counter = iter(range(1, 100))
    return re.sub(r"\?", lambda _m: f"${next(counter)}", sql)


class SQLiteAdapterTables:
    """Adapter methods of the Store protocol for SQLiteStore."""

    async def _run(self, fn: Any, *args: Any) -> Any:  # provided by SQLiteStore
        raise NotImplementedError

    async def adapter_put(self, row: AdapterRow) -> None:
        """Insert or replace one registered adapter (one committed transaction)."""
        def run(conn: sqlite3.Connection) -> None:  # autocommit: one statement, one commit
            conn.execute(_PUT, (row.base, row.adapter_id, row.path, float(row.created_at)))
        await self._run(run)

    async def adapter_list(self) -> list[AdapterRow]:
        """Every registered adapter, ordered by base model then adapter id."""
        def run(conn: sqlite3.Connection) -> list[AdapterRow]:
            return [AdapterRow(*r) for r in conn.execute(_LIST).fetchall()]
        return await self._run(run)

    async def adapter_delete(self, base: str, adapter_id: str) -> bool:
        """Forget one registered adapter; False when there was none."""
        def run(conn: sqlite3.Connection) -> bool:
            return conn.execute(_DELETE, (base, adapter_id)).rowcount > 0
        return await self._run(run)


class PostgresAdapterTables:
    """Adapter methods of the Store protocol for PostgresStore."""

    def _require_pool(self) -> Any:  # provided by PostgresStore
        raise NotImplementedError

    async def adapter_put(self, row: AdapterRow) -> None:
        """Insert or replace one registered adapter."""
        await self._require_pool().execute(
            _pg(_PUT), row.base, row.adapter_id, row.path, float(row.created_at)
        )

    async def adapter_list(self) -> list[AdapterRow]:
        """Every registered adapter, ordered by base model then adapter id."""
        rows = await self._require_pool().fetch(_LIST)
        return [AdapterRow(r[0], r[1], r[2], float(r[3])) for r in rows]

    async def adapter_delete(self, base: str, adapter_id: str) -> bool:
        """Forget one registered adapter; False when there was none."""
        status = await self._require_pool().execute(_pg(_DELETE), base, adapter_id)
        return status.split()[-1] != "0"

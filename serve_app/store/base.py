"""The store interface (contract shared by the SQLite and PostgreSQL implementations).

Everything is async. Implementations must be safe to call from one asyncio loop with
many concurrent callers (the metrics actor, the gateway), and durable when a call
returns (committed).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

from serve_app.protocol.metrics import LedgerEntry
from serve_app.store.rows import CredentialRow, LedgerTotalsRow

__all__ = ["Store", "LedgerTotalsRow", "open_store"]


@runtime_checkable
class Store(Protocol):
    """Persistent state. The ledger methods come first; later issues add their tables."""

    url: str

    async def open(self) -> None:
        """Connect and create/migrate tables (idempotent)."""

    async def close(self) -> None:
        """Release connections."""

    async def ledger_append(self, entries: Sequence[LedgerEntry]) -> int:
        """Append entries; an entry whose ``event.event_id`` exists is skipped.

        Returns how many rows were new. Atomic per call.
        """

    async def ledger_totals(self) -> list[LedgerTotalsRow]:
        """Totals grouped by (model, provider, route, key_id, tier, status, error_code)."""

    async def ledger_window(self, start_ts: float, end_ts: float) -> list[LedgerEntry]:
        """Every entry with ``start_ts <= event.ts < end_ts``, oldest first."""

    async def ledger_count(self) -> int:
        """Number of entries (tests and health)."""

    async def credential_put(self, row: CredentialRow) -> None:
        """Insert or replace the admin-set credential ``row.name`` (durable on return)."""

    async def credential_list(self) -> list[CredentialRow]:
        """Every admin-set credential, ordered by name."""

    async def credential_delete(self, name: str) -> bool:
        """Forget an admin-set credential; False when there was none."""


def open_store(url: str) -> Store:
    """Build (not open) the store for ``url``.

    * ``postgresql://user@host:port/db`` (or ``postgres://``): PostgreSQL.
    * ``sqlite:///var/lib/troupe/troupe.db``: SQLite. The path after ``sqlite://`` is
      always absolute here (``sqlite:///x`` and ``sqlite:////x`` both mean ``/x``).
    * A bare path (no scheme): SQLite, relative to the working directory.

    Raises:
        ValueError: for any other scheme (a typo must not silently become a file name).
    """
    if url.startswith(("postgresql://", "postgres://")):
        from serve_app.store.postgres import PostgresStore

        return PostgresStore(url)
    if "://" in url and not url.startswith("sqlite:///"):
        raise ValueError(
            f"unsupported store URL {url.split('://', 1)[0]}://...: use "
            "sqlite:///absolute/path.db, a file path, or postgresql://user@host:port/db"
        )
    from serve_app.store.sqlite import SQLiteStore

    if url.startswith("sqlite:///"):
        return SQLiteStore("/" + url[len("sqlite:///"):].lstrip("/"))
    return SQLiteStore(url)

"""The store interface (contract shared by the SQLite and PostgreSQL implementations).

Everything is async. Implementations must be safe to call from one asyncio loop with
many concurrent callers (the metrics actor, the gateway), and durable when a call
returns (committed).
"""

from __future__ import annotations

from typing import Optional, Protocol, Sequence, runtime_checkable

from serve_app.protocol.metrics import LedgerEntry
from serve_app.store.adapter_tables import AdapterRow
from serve_app.store.policy_rows import ApiKeyRow, BatchItemRow, BatchJobRow, IdempotencyRow
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

    # --- API keys (serve_app.policies): hashes only, never a secret -------------------

    async def key_create(self, key: ApiKeyRow) -> None:
        """Insert a key; a duplicate ``key_id`` raises."""

    async def key_list(self) -> list[ApiKeyRow]:
        """Every key, revoked ones included, oldest first (``created_at``, then id)."""

    async def key_revoke(self, key_id: str, now: float) -> bool:
        """Mark a key revoked at ``now``; False if unknown or already revoked."""

    # --- idempotency records -------------------------------------------------------------

    async def idempotency_claim(
        self, scope: str, fingerprint: str, now: float, lock_until: float
    ) -> Optional[IdempotencyRow]:
        """Atomically claim ``scope``: None when the caller now owns a ``running`` record
        (none was live at ``now``), else the live record that exists."""

    async def idempotency_complete(
        self, scope: str, fingerprint: str, status: int,
        headers: Sequence[tuple[str, str]], body: Optional[bytes], expires_at: float,
    ) -> None:
        """Store the response of the claimed request (``body`` None: ``unavailable``)."""

    async def idempotency_release(self, scope: str, fingerprint: str) -> None:
        """Drop a ``running`` claim (the request failed; a retry may run it)."""

    async def idempotency_purge(self, now: float) -> int:
        """Delete records expired at ``now``; returns how many."""

    # --- batch jobs (serve_app/gateway/batch.py) --------------------------------------------------

    async def adapter_put(self, row: AdapterRow) -> None:
        """Insert or replace one LoRA adapter registered at run time."""

    async def adapter_list(self) -> list[AdapterRow]:
        """Every registered adapter, ordered by base model then adapter id."""

    async def adapter_delete(self, base: str, adapter_id: str) -> bool:
        """Forget one registered adapter; False when there was none."""

    async def batch_create(self, job: BatchJobRow, items: Sequence[BatchItemRow]) -> None:
        """Insert a job and its items atomically."""

    async def batch_get(self, job_id: str) -> Optional[BatchJobRow]:
        """The job, with ``counts`` of its items per state; None if unknown."""

    async def batch_items(self, job_id: str) -> list[BatchItemRow]:
        """The job's items in submission order."""

    async def batch_claim(self, worker: str, now: float, lease_until: float,
                          limit: int) -> list[BatchItemRow]:
        """Atomically lease up to ``limit`` pending or lease-expired items to ``worker``
        (``attempts`` + 1 each); a job with a claimed item becomes ``running``."""

    async def batch_item_done(self, job_id: str, item_id: str, worker: str, state: str,
                              result: dict) -> bool:
        """Record a result if ``worker`` still holds the item (one result per item)."""

    async def batch_complete_if_done(self, job_id: str, now: float) -> bool:
        """Complete the job once no item is pending or running; True for one caller only."""

    async def batch_webhooks_due(self, now: float, lease_until: float,
                                 limit: int) -> list[BatchJobRow]:
        """Lease completed jobs whose webhook delivery is due."""

    async def batch_webhook_update(self, job_id: str, state: str, attempts: int,
                                   next_at: float, error: Optional[str]) -> None:
        """Record a webhook attempt: state pending (retry at ``next_at``), delivered, failed."""


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

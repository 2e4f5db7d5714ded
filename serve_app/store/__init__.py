"""Persistent state behind one small interface: SQLite by default, PostgreSQL for clusters.

``open_store(url)`` returns a :class:`~serve_app.store.base.Store` for ``sqlite:///path``
(or a bare path) and ``postgresql://user@host:port/db``. Domain repositories (the cost
ledger first; keys, idempotency records and batch jobs later) are methods grouped per
table, written once in portable SQL.
"""

from serve_app.store.base import Store, open_store
from serve_app.store.rows import CredentialRow, LedgerTotalsRow

__all__ = ["Store", "CredentialRow", "LedgerTotalsRow", "open_store"]

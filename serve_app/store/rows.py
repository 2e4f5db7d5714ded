"""Row shapes shared by the store backends: the ledger's columns, its aggregate row and query.

Both backends store a :class:`~serve_app.protocol.metrics.LedgerEntry` as one flat row in
the order of :data:`LEDGER_COLUMNS` and convert with :func:`entry_to_row` /
:func:`row_to_entry`, so SQLite and PostgreSQL hand back identical entries (same Python
types, same floats) for the same input. Imports neither Ray nor a database driver.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from serve_app.protocol.metrics import LedgerEntry, RequestEvent

__all__ = [
    "CredentialRow",
    "EVENT_COLUMNS",
    "LEDGER_COLUMNS",
    "LEDGER_TOTALS_SQL",
    "TOTALS_GROUP_COLUMNS",
    "LedgerTotalsRow",
    "decode_inter_token_ms",
    "encode_inter_token_ms",
    "entry_to_row",
    "row_to_entry",
]

# One column per RequestEvent field, in declaration order (a test checks they match).
EVENT_COLUMNS: tuple[str, ...] = (
    "event_id", "ts", "model", "route", "provider", "key_id", "tier", "status",
    "error_code", "finish_reason", "stream", "prompt_tokens", "completion_tokens",
    "usage_estimated", "queue_ms", "ttft_ms", "e2e_ms", "inter_token_ms", "replica_busy_s",
    "cold_start", "adapter_load_ms", "cached_tokens", "audio_in_s", "audio_out_s", "ttfa_ms",
)
LEDGER_COLUMNS: tuple[str, ...] = EVENT_COLUMNS + ("cost_usd", "cost_estimated", "price_source")

# The grouping (and ordering) key of ``Store.ledger_totals``.
TOTALS_GROUP_COLUMNS: tuple[str, ...] = (
    "model", "provider", "route", "key_id", "tier", "status", "error_code",
)

# Portable (SQLite and PostgreSQL alike). Ordered by the group key so both backends list
# groups identically: text columns compare bytewise (SQLite BINARY, PostgreSQL COLLATE "C"
# on the columns) and NULL error codes come first in both.
LEDGER_TOTALS_SQL = f"""
SELECT {", ".join(TOTALS_GROUP_COLUMNS)},
       COUNT(*), SUM(prompt_tokens), SUM(completion_tokens), SUM(cost_usd),
       SUM(CASE WHEN cost_estimated THEN 1 ELSE 0 END)
FROM ledger
GROUP BY {", ".join(TOTALS_GROUP_COLUMNS)}
ORDER BY {", ".join(TOTALS_GROUP_COLUMNS)} NULLS FIRST
"""

_INT_COLUMNS = frozenset({"status", "prompt_tokens", "completion_tokens", "cached_tokens"})
_FLOAT_COLUMNS = frozenset({"ts", "e2e_ms", "queue_ms", "ttft_ms", "replica_busy_s",
                            "adapter_load_ms", "audio_in_s", "audio_out_s", "ttfa_ms"})
_BOOL_COLUMNS = frozenset({"stream", "usage_estimated", "cold_start"})


@dataclass(frozen=True, slots=True)
class LedgerTotalsRow:
    """One aggregate row of the ledger: the sums for one group (see ``Store.ledger_totals``)."""

    model: str
    provider: str
    route: str
    key_id: str
    tier: str
    status: int
    error_code: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float
    estimated: int  # entries whose cost was estimated

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> LedgerTotalsRow:
        """Build from a result row ordered as the group columns, then the five sums."""
        (model, provider, route, key_id, tier, status, error_code,
         requests, prompt_tokens, completion_tokens, cost_usd, estimated) = row
        return cls(
            model=model, provider=provider, route=route, key_id=key_id, tier=tier,
            status=int(status), error_code=error_code, requests=int(requests),
            prompt_tokens=int(prompt_tokens or 0), completion_tokens=int(completion_tokens or 0),
            cost_usd=float(cost_usd or 0.0), estimated=int(estimated or 0),
        )


def _scalar(name: str, value: Any) -> Any:
    """``value`` as the Python type of column ``name`` (SQLite hands booleans back as 0/1)."""
    if value is None:
        return None
    if name in _INT_COLUMNS:
        return int(value)
    if name in _FLOAT_COLUMNS:
        return float(value)
    if name in _BOOL_COLUMNS:
        return bool(value)
    return value


def encode_inter_token_ms(gaps: Sequence[float]) -> str:
    """JSON text of the gaps; ``repr``-exact floats, so decoding gives the same values.

    NaN and infinities are refused (``ValueError``): they are not JSON, and PostgreSQL's
    JSONB would reject them, so both backends refuse them the same way.
    """
    return json.dumps([float(g) for g in gaps], allow_nan=False, separators=(",", ":"))


def decode_inter_token_ms(text: str | None) -> list[float]:
    """Inverse of :func:`encode_inter_token_ms` (JSONB may print ``1e20`` as an integer)."""
    if not text:
        return []
    return [float(g) for g in json.loads(text)]


def entry_to_row(entry: LedgerEntry) -> tuple[Any, ...]:
    """Flatten ``entry`` into a row ordered as :data:`LEDGER_COLUMNS`, with exact types."""
    event = entry.event
    row: list[Any] = [
        encode_inter_token_ms(event.inter_token_ms) if name == "inter_token_ms"
        else _scalar(name, getattr(event, name))
        for name in EVENT_COLUMNS
    ]
    row += [float(entry.cost_usd), bool(entry.cost_estimated), entry.price_source]
    return tuple(row)


def row_to_entry(row: Sequence[Any]) -> LedgerEntry:
    """Rebuild a :class:`LedgerEntry` from a row ordered as :data:`LEDGER_COLUMNS`."""
    values = dict(zip(LEDGER_COLUMNS, row, strict=True))
    fields: dict[str, Any] = {
        name: decode_inter_token_ms(values[name]) if name == "inter_token_ms"
        else _scalar(name, values[name])
        for name in EVENT_COLUMNS
    }
    return LedgerEntry(
        event=RequestEvent(**fields),
        cost_usd=float(values["cost_usd"]),
        cost_estimated=bool(values["cost_estimated"]),
        price_source=values["price_source"],
    )


@dataclass(frozen=True, slots=True)
class CredentialRow:
    """An admin-set provider credential (``Store.credential_*``). ``secret`` never prints."""

    name: str
    secret: str = field(repr=False)
    fingerprint: str
    updated_at: float

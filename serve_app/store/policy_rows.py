"""Row shapes of the policy tables: API keys and idempotency records.

Shared by the SQLite and PostgreSQL backends (see ``policy_sqlite`` / ``policy_postgres``),
so both hand back identical rows. Imports neither Ray nor a database driver.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

__all__ = [
    "KEY_COLUMNS",
    "IDEMPOTENCY_COLUMNS",
    "ApiKeyRow",
    "IdempotencyRow",
    "key_to_row",
    "row_to_key",
    "idempotency_from_row",
    "BATCH_JOB_COLUMNS",
    "BATCH_ITEM_COLUMNS",
    "BatchJobRow",
    "BatchItemRow",
    "job_to_row",
    "row_to_job",
    "item_to_row",
    "row_to_item",
]

KEY_COLUMNS: tuple[str, ...] = (
    "key_id", "name", "secret_hash", "role", "models", "limits",
    "created_at", "expires_at", "revoked_at",
)
IDEMPOTENCY_COLUMNS: tuple[str, ...] = (
    "scope", "fingerprint", "state", "status", "headers", "body", "created_at", "expires_at",
)

ROLES = ("workspace", "models", "admin")


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    """One API key as stored: never the secret, only its SHA-256 (hex).

    ``role``: ``workspace`` (every model), ``models`` (only ``models``) or ``admin``
    (everything, admin routes included). ``limits``: per-key rate-limit overrides.
    """

    key_id: str
    name: str
    secret_hash: str
    role: str
    models: tuple[str, ...] = ()
    limits: dict[str, Any] = field(default_factory=dict)
    created_at: float = 0.0
    expires_at: Optional[float] = None
    revoked_at: Optional[float] = None

    def public(self) -> dict[str, Any]:
        """What list/get routes show (no hash)."""
        return {
            "id": self.key_id, "name": self.name, "role": self.role,
            "models": list(self.models), "limits": dict(self.limits),
            "created_at": self.created_at, "expires_at": self.expires_at,
            "revoked_at": self.revoked_at,
        }


@dataclass(frozen=True, slots=True)
class IdempotencyRow:
    """One idempotency record: ``running`` while the first request runs, then ``done``
    (status, headers and body stored) or ``unavailable`` (the body was too large to keep)."""

    scope: str
    fingerprint: str
    state: str
    status: Optional[int]
    headers: tuple[tuple[str, str], ...]
    body: Optional[bytes]
    created_at: float
    expires_at: float


def key_to_row(key: ApiKeyRow) -> tuple[Any, ...]:
    if key.role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {key.role!r}")
    return (
        key.key_id, key.name, key.secret_hash, key.role,
        json.dumps(list(key.models)), json.dumps(key.limits, sort_keys=True),
        float(key.created_at),
        None if key.expires_at is None else float(key.expires_at),
        None if key.revoked_at is None else float(key.revoked_at),
    )


def row_to_key(row: Sequence[Any]) -> ApiKeyRow:
    (key_id, name, secret_hash, role, models, limits,
     created_at, expires_at, revoked_at) = row
    return ApiKeyRow(
        key_id=key_id, name=name, secret_hash=secret_hash, role=role,
        models=tuple(json.loads(models)), limits=json.loads(limits),
        created_at=float(created_at),
        expires_at=None if expires_at is None else float(expires_at),
        revoked_at=None if revoked_at is None else float(revoked_at),
    )


def encode_headers(headers: Sequence[tuple[str, str]]) -> str:
    return json.dumps([list(h) for h in headers])


def idempotency_from_row(row: Sequence[Any]) -> IdempotencyRow:
    scope, fingerprint, state, status, headers, body, created_at, expires_at = row
    return IdempotencyRow(
        scope=scope, fingerprint=fingerprint, state=state,
        status=None if status is None else int(status),
        headers=tuple((str(k), str(v)) for k, v in json.loads(headers)),
        body=None if body is None else bytes(body),
        created_at=float(created_at), expires_at=float(expires_at),
    )


# --- batch jobs ------------------------------------------------------------------------------

BATCH_JOB_COLUMNS: tuple[str, ...] = (
    "job_id", "key_id", "model", "status", "params", "webhook_url", "created_at",
    "completed_at", "webhook_state", "webhook_attempts", "webhook_next_at",
    "webhook_lease_until", "webhook_error",
)
BATCH_ITEM_COLUMNS: tuple[str, ...] = (
    "job_id", "item_id", "position", "request", "state", "attempts", "lease_until",
    "worker", "result",
)


@dataclass(frozen=True, slots=True)
class BatchJobRow:
    """A batch job. ``status``: queued, running, completed. ``webhook_state``: none,
    pending, delivered, failed. ``counts``: items per state (filled by ``batch_get``)."""

    job_id: str
    key_id: str
    model: str
    status: str
    params: dict[str, Any]
    webhook_url: Optional[str]
    created_at: float
    completed_at: Optional[float] = None
    webhook_state: str = "none"
    webhook_attempts: int = 0
    webhook_next_at: float = 0.0
    webhook_lease_until: float = 0.0
    webhook_error: Optional[str] = None
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class BatchItemRow:
    """One request of a batch. ``state``: pending, running, succeeded, failed."""

    job_id: str
    item_id: str
    position: int
    request: dict[str, Any]
    state: str = "pending"
    attempts: int = 0
    lease_until: float = 0.0
    worker: Optional[str] = None
    result: Optional[dict[str, Any]] = None


def job_to_row(job: BatchJobRow) -> tuple[Any, ...]:
    return (job.job_id, job.key_id, job.model, job.status, json.dumps(job.params),
            job.webhook_url, float(job.created_at), job.completed_at, job.webhook_state,
            int(job.webhook_attempts), float(job.webhook_next_at),
            float(job.webhook_lease_until), job.webhook_error)


def row_to_job(row: Sequence[Any], counts: Optional[dict[str, int]] = None) -> BatchJobRow:
    values = dict(zip(BATCH_JOB_COLUMNS, row, strict=True))
    values["params"] = json.loads(values["params"])
    for name in ("created_at", "webhook_next_at", "webhook_lease_until"):
        values[name] = float(values[name])
    if values["completed_at"] is not None:
        values["completed_at"] = float(values["completed_at"])
    values["webhook_attempts"] = int(values["webhook_attempts"])
    return BatchJobRow(**values, counts=dict(counts or {}))


def item_to_row(item: BatchItemRow) -> tuple[Any, ...]:
    return (item.job_id, item.item_id, int(item.position), json.dumps(item.request),
            item.state, int(item.attempts), float(item.lease_until), item.worker,
            None if item.result is None else json.dumps(item.result))


def row_to_item(row: Sequence[Any]) -> BatchItemRow:
    values = dict(zip(BATCH_ITEM_COLUMNS, row, strict=True))
    values["request"] = json.loads(values["request"])
    values["result"] = None if values["result"] is None else json.loads(values["result"])
    values["position"] = int(values["position"])
    values["attempts"] = int(values["attempts"])
    values["lease_until"] = float(values["lease_until"])
    return BatchItemRow(**values)

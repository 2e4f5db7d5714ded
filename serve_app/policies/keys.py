"""API keys: minting, hashing, and the per-replica key cache.

A key looks like ``trp_<key id>_<secret>``. Only ``sha256(whole key)`` is stored; a
presented key is hashed and compared in constant time with :func:`hmac.compare_digest`.
Secrets are 256 random bits, so a fast hash is enough (no password stretching needed).

Each gateway replica holds every key in memory (:class:`KeyCache`) and reloads the table
every ``auth.key_refresh_s`` seconds: no store round trip per request, and a created or
revoked key takes effect on every replica within that time.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from typing import Any, Callable, Optional

from serve_app.errors import AuthenticationFailed, InvalidRequest
from serve_app.policies.context import Principal
from serve_app.settings.policies import RateLimits
from serve_app.store.policy_rows import ROLES, ApiKeyRow

__all__ = ["KEY_PREFIX", "mint_key", "hash_key", "key_id_of", "KeyCache"]

logger = logging.getLogger("troupe.auth")

KEY_PREFIX = "trp_"
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


def hash_key(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def key_id_of(token: str) -> Optional[str]:
    """The public id inside a key (``trp_<id>_<secret>``), or None if it is not one."""
    if not token.startswith(KEY_PREFIX):
        return None
    key_id, sep, secret = token[len(KEY_PREFIX):].partition("_")
    return key_id if sep and key_id and secret else None


def mint_key(
    name: str,
    role: str = "workspace",
    models: tuple[str, ...] = (),
    limits: Optional[dict[str, Any]] = None,
    expires_at: Optional[float] = None,
    now: Optional[float] = None,
) -> tuple[str, ApiKeyRow]:
    """A new key: ``(secret to show once, row to store)``.

    Raises:
        InvalidRequest: bad role, a model-scoped key without models, or bad limits.
    """
    if role not in ROLES:
        raise InvalidRequest(f"role must be one of {', '.join(ROLES)}; got {role!r}.",
                             param="role")
    if role == "models" and not models:
        raise InvalidRequest("A key with role 'models' needs a non-empty 'models' list, "
                             'e.g. {"name": "ci", "role": "models", "models": ["mock-5ms"]}.',
                             param="models")
    checked = RateLimits.model_validate(limits or {})  # names and ranges checked
    key_id = secrets.token_hex(8)
    token = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    row = ApiKeyRow(
        key_id=key_id, name=name, secret_hash=hash_key(token), role=role,
        models=tuple(models) if role == "models" else (),
        limits=checked.model_dump(exclude_none=True),
        created_at=time.time() if now is None else now, expires_at=expires_at,
    )
    return token, row


class KeyCache:
    """Every key of the store, in memory, refreshed in the background.

    Args:
        store: the state store (opened by the caller).
        refresh_s: reload period.
    """

    def __init__(self, store: Any, refresh_s: float) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.keys: dict[str, ApiKeyRow] = {}
        self.loaded_at = 0.0
        self._task: Optional[asyncio.Task] = None
        #: Called after every reload (the policy layer starts the quota actor from it).
        self.on_refresh: Optional[Callable[[], None]] = None

    @property
    def has_active_keys(self) -> bool:
        now = time.time()
        return any(k.revoked_at is None and (k.expires_at is None or k.expires_at > now)
                   for k in self.keys.values())

    @property
    def have_limits(self) -> bool:
        """Some active key has rate limits of its own (an override of 0 is none)."""
        now = time.time()
        return any(k.revoked_at is None and (k.expires_at is None or k.expires_at > now)
                   and any(k.limits.values()) for k in self.keys.values())

    async def refresh(self) -> None:
        rows = await self.store.key_list()
        self.keys = {row.key_id: row for row in rows}
        self.loaded_at = time.time()
        if self.on_refresh is not None:
            self.on_refresh()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name="troupe-key-refresh")

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as exc:  # keep serving with the last good copy
                logger.warning("could not reload API keys (%s); keeping the last copy",
                               type(exc).__name__)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def authenticate(self, token: str) -> Principal:
        """The key's principal; AuthenticationFailed when unknown, revoked or expired."""
        key_id = key_id_of(token)
        row = self.keys.get(key_id) if key_id else None
        presented = hash_key(token)
        # Compare even when the id is unknown, so timing does not tell ids apart.
        if not hmac.compare_digest(presented, row.secret_hash if row else _DUMMY_HASH) or row is None:
            raise AuthenticationFailed(
                "The API key is not valid. Send a key created with `troupe keys create` as "
                "'Authorization: Bearer trp_...' (or 'x-api-key: trp_...')."
            )
        if row.revoked_at is not None:
            raise AuthenticationFailed(
                f"The API key {row.key_id} was revoked. Ask an admin for a new key."
            )
        if row.expires_at is not None and row.expires_at <= time.time():
            raise AuthenticationFailed(f"The API key {row.key_id} has expired.")
        return Principal(row.key_id, row.role, frozenset(row.models), dict(row.limits))

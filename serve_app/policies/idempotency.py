"""``Idempotency-Key`` for non-streaming POSTs, shared across replicas through the store.

The first request with a key claims a ``running`` record; when it ends, its response
(status, body, content headers) is stored for ``idempotency.ttl_s``. A repeat with the same
key and the same request (method, path, query, body) gets the stored response, marked
``Idempotent-Replayed: true``, and runs nothing (so nothing is charged). The same key with
another request: 422 ``IDEMPOTENCY_KEY_REUSED``; while the first still runs: 409
``IDEMPOTENCY_IN_PROGRESS``; a response too large to keep: 409
``IDEMPOTENCY_REPLAY_UNAVAILABLE`` on repeat. Failures (5xx), 409 and 429 are not kept:
the claim is dropped so the request may be retried. Keys are per API key (two callers
may use the same key string). Streaming requests (``"stream": true``) are not replayed:
the header is ignored for them.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any, Optional

import orjson
from starlette.types import Message, Receive, Scope, Send

from serve_app.errors import (
    IdempotencyInProgress,
    IdempotencyKeyReused,
    IdempotencyReplayUnavailable,
    InvalidRequest,
    RequestTooLarge,
)
from serve_app.settings.policies import IdempotencySettings
from serve_app.store.policy_rows import IdempotencyRow

__all__ = ["IdempotencyGuard", "read_body", "replay_receive", "check_key"]

MAX_KEY_LENGTH = 255
# Response headers never stored (they describe this exchange, not the result).
_SKIP_HEADERS = {b"content-length", b"date", b"server", b"x-request-id", b"x-client-request-id"}
_SKIP_PREFIX = b"x-ratelimit-"


def check_key(raw: bytes) -> str:
    """The header's value, or 400 when it is not 1-255 printable ASCII characters."""
    if not 0 < len(raw) <= MAX_KEY_LENGTH or not all(0x20 < b < 0x7F for b in raw):
        raise InvalidRequest(
            "Idempotency-Key must be 1-255 printable ASCII characters without spaces, e.g. "
            "'Idempotency-Key: 3f2b8c1e-order-42'.",
            param="Idempotency-Key",
        )
    return raw.decode("ascii")


async def read_body(receive: Receive, max_bytes: int) -> Optional[bytes]:
    """The whole request body (None if the client left); 413 beyond ``max_bytes``."""
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise RequestTooLarge(
                f"The request body is over {max_bytes} bytes, the most this gateway accepts.",
                details={"max_bytes": max_bytes},
            )
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


def replay_receive(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that yields ``body`` once, then waits on the real one (disconnects)."""
    sent = False

    async def wrapped() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped


def is_stream_request(body: bytes) -> bool:
    if b'"stream"' not in body:
        return False
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(data, dict) and data.get("stream") is True


class IdempotencyGuard:
    """One request's idempotency: claim, then store or release (see module doc)."""

    def __init__(self, store: Any, settings: IdempotencySettings, lock_s: float,
                 scope_key: str, fingerprint: str) -> None:
        self.store = store
        self.settings = settings
        self.lock_s = lock_s
        self.scope_key = scope_key
        self.fingerprint = fingerprint
        self.settled = False

    @staticmethod
    def fingerprint_of(scope: Scope, body: bytes) -> str:
        digest = hashlib.sha256()
        for part in (scope["method"], scope["path"], scope.get("query_string", b"")):
            digest.update(part if isinstance(part, bytes) else part.encode())
            digest.update(b"\0")
        digest.update(body)
        return digest.hexdigest()

    async def claim(self) -> Optional[IdempotencyRow]:
        """None: run the request; else the stored record to answer from (or raise)."""
        now = time.time()
        record = await self.store.idempotency_claim(
            self.scope_key, self.fingerprint, now, now + self.lock_s)
        if record is None:
            return None
        self.settled = True  # not ours: nothing to store or release
        if record.fingerprint != self.fingerprint:
            raise IdempotencyKeyReused(
                "This Idempotency-Key was already used with a different request (method, "
                "path or body). Use a new key for a new request.",
                param="Idempotency-Key",
            )
        if record.state == "running":
            raise IdempotencyInProgress(
                "A request with this Idempotency-Key is still running. Retry after it "
                "finishes to get its response.",
                param="Idempotency-Key", retry_after_s=1,
            )
        if record.state == "unavailable":
            raise IdempotencyReplayUnavailable(
                f"The first response to this Idempotency-Key was larger than "
                f"{self.settings.max_stored_bytes} bytes and was not stored, so it cannot be "
                "replayed. The request was already processed; use a new key to run it again.",
                param="Idempotency-Key",
            )
        return record

    async def replay(self, record: IdempotencyRow, send: Send) -> None:
        body = record.body or b""
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in record.headers]
        headers += [(b"content-length", str(len(body)).encode()),
                    (b"idempotent-replayed", b"true")]
        await send({"type": "http.response.start", "status": record.status or 200,
                    "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    def wrap_send(self, send: Send) -> Send:
        """Buffer the response (up to the stored-size cap), store it, then send it."""
        limit = self.settings.max_stored_bytes
        start: Optional[Message] = None
        parts: list[bytes] = []
        size = 0
        passthrough = False

        async def wrapped(message: Message) -> None:
            nonlocal start, size, passthrough
            kind = message["type"]
            if kind == "http.response.start":
                start = message
                return
            if kind != "http.response.body" or start is None:
                await send(message)
                return
            chunk = message.get("body", b"")
            more = message.get("more_body", False)
            if not passthrough:
                size += len(chunk)
                parts.append(chunk)
                if size > limit:
                    passthrough = True
                    await send(start)
                    await send({"type": "http.response.body", "body": b"".join(parts),
                                "more_body": more})
                    parts.clear()
                    if not more:
                        await self.settle(start, None)
                    return
                if more:
                    return
                await self.settle(start, b"".join(parts))
                await send(start)
                await send({"type": "http.response.body", "body": b"".join(parts),
                            "more_body": False})
                return
            if not more:
                await self.settle(start, None)
            await send(message)

        return wrapped

    async def settle(self, start: Message, body: Optional[bytes]) -> None:
        """Store the finished response, or drop the claim when it must not be replayed."""
        if self.settled:
            return
        self.settled = True
        status = int(start["status"])
        if status >= 500 or status in (409, 429):
            await self.store.idempotency_release(self.scope_key, self.fingerprint)
            return
        headers = [
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in start.get("headers", ())
            if k.lower() not in _SKIP_HEADERS and not k.lower().startswith(_SKIP_PREFIX)
        ]
        await self.store.idempotency_complete(
            self.scope_key, self.fingerprint, status, headers, body,
            time.time() + self.settings.ttl_s,
        )

    async def abandon(self) -> None:
        """The request ended without a response (error, client gone): drop the claim."""
        if not self.settled:
            self.settled = True
            await self.store.idempotency_release(self.scope_key, self.fingerprint)

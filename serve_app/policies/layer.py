"""The policy layer: one ASGI middleware applying auth, scopes, rate limits and idempotency.

Route-agnostic: requests are classified by method and path only, so routes added later
are covered without code of their own.

* **public**: ``GET``/``HEAD`` of ``auth.public_paths`` (health, playground, docs) and
  ``OPTIONS`` (CORS preflights): no key needed.
* **admin**: ``/admin/...``, ``/metrics``, ``/metrics/custom``, ``/traces`` and
  ``POST /models/{id}/load|unload``, ``/models/{id}/adapters[/{adapter}]``: an admin key.
* everything else: any valid key; a model-scoped key is checked where the gateway
  resolves the model id (``GatewayCore.resolve``), whatever the route or body format.

Credentials: ``Authorization: Bearer <key or JWT>``, ``x-api-key: <key>`` (Anthropic
style), or ``x-goog-api-key: <key>`` / a ``key=<key>`` query parameter (Gemini style; the
query form only on ``/v1beta`` paths). WebSockets may instead send ``{"type": "auth", "token": ...}`` first; browser
Origins on ``/ws`` must be allowed. No credential: 401; a valid one without the right:
403, in the route family's envelope.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import Any, Callable, Optional
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import AuthenticationFailed, AuthorizationFailed, TroupeError
from serve_app.http.plumbing import error_response, is_gemini_path
from serve_app.policies.context import ANONYMOUS, PRINCIPAL, USAGE, Principal, UsageTally
from serve_app.policies.idempotency import (
    IdempotencyGuard,
    check_key,
    is_stream_request,
    read_body,
    replay_receive,
)
from serve_app.policies.jwt_auth import JWTVerifier, looks_like_jwt
from serve_app.policies.keys import KeyCache
from serve_app.policies.ratelimit import QuotaClient, RateLimiter

__all__ = ["PolicyLayer", "PolicyMiddleware", "classify", "is_loopback"]

logger = logging.getLogger("troupe.auth")

ADMIN_PATHS = frozenset({"/metrics", "/metrics/custom", "/traces"})


def is_loopback(host: Optional[str]) -> bool:
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def classify(method: str, path: str, public_paths: tuple[str, ...]) -> str:
    """``public``, ``admin`` or ``user`` for a request (method + path only)."""
    if method == "OPTIONS":
        return "public"
    if path.startswith("/admin/") or path == "/admin" or path in ADMIN_PATHS:
        return "admin"
    if method == "POST" and path.startswith("/models/") and path.endswith(("/load", "/unload")):
        return "admin"
    if path.startswith("/models/") and (path.endswith("/adapters") or "/adapters/" in path):
        return "admin"  # LoRA adapter registration (serve_app/routes/adapters.py)
    if method in ("GET", "HEAD"):
        for public in public_paths:
            if path == public or (public.endswith("/") and public != "/" and path.startswith(public)):
                return "public"
    return "user"


def _path(scope: Scope) -> str:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


class PolicyLayer:
    """The policies of one gateway replica (settings, key cache, limiter, store).

    Args:
        settings: the TroupeSettings tree.
        store: the state store (unopened; opened on first use).
        quota: the quota actor handle (or a local QuotaActor); None: no rate limits.
        bind_host: the host the gateway's HTTP server is bound to (None: unknown,
            treated as not loopback, so auth stays on).
        on_rejected: told of requests refused here (metrics), as the error handlers are.
    """

    def __init__(self, settings: Any, store: Any, quota: Any = None,
                 bind_host: Optional[str] = None,
                 on_rejected: Optional[Callable[[str, TroupeError, str], None]] = None,
                 core: Any = None) -> None:
        self.settings = settings
        self.store = store
        self.keys = KeyCache(store, settings.auth.key_refresh_s)
        self.jwt = JWTVerifier(settings.auth.jwt) if settings.auth.jwt else None
        self.limiter = RateLimiter(settings.limits, QuotaClient(quota)) if quota is not None else None
        if self.limiter is not None:
            limiter = self.limiter
            self.keys.on_refresh = lambda: limiter.prepare(self.keys.have_limits)
        self.loopback = is_loopback(bind_host)
        self.bind_host = bind_host
        self.on_rejected = on_rejected
        self.public_paths = tuple(settings.auth.public_paths)
        self.origins = frozenset(settings.auth.websocket_origins)
        self.lock_s = settings.gateway.request_timeout_s + 30
        self._ready: Optional[asyncio.Future] = None
        self._auth_was_off: Optional[bool] = None
        #: Batch jobs run by this replica (needs the core; None in core-less tests).
        self.batch = None
        if core is not None and settings.batch.enabled:
            import os
            import socket

            from serve_app.gateway.batch import BatchRunner

            self.batch = BatchRunner(core, store, settings.batch,
                                     f"{socket.gethostname()}:{os.getpid()}:{os.urandom(3).hex()}")

    async def ready(self) -> None:
        """Open the store and load keys once (the first request waits for it)."""
        if self._ready is None:
            self._ready = asyncio.ensure_future(self._start())
        await asyncio.shield(self._ready)

    async def _start(self) -> None:
        await self.store.open()
        await self.keys.refresh()
        self.keys.start()
        if self.batch is not None:
            self.batch.start()  # resumes stored jobs after a restart
        self.auth_required()  # logs the notice when auth is off

    async def close(self) -> None:
        if self.batch is not None:
            await self.batch.stop()
        await self.keys.stop()
        await self.store.close()

    def auth_required(self) -> bool:
        off = (self.settings.auth.mode == "auto" and self.loopback and self.jwt is None
               and not self.keys.keys)  # any key ever made, even revoked
        if off != self._auth_was_off:
            self._auth_was_off = off
            if off:
                logger.warning(
                    "AUTH IS OFF: the gateway is bound to loopback (%s) and no API key exists. "
                    "Anyone on this machine can use it. Create a key (`troupe keys create`) to "
                    "turn auth on.", self.bind_host)
            else:
                logger.info("auth is on (API keys%s)", " and JWTs" if self.jwt else "")
        return not off

    def authenticate(self, token: str) -> Principal:
        if self.jwt is not None and looks_like_jwt(token):
            return self.jwt.verify(token)
        return self.keys.authenticate(token)

    def origin_allowed(self, origin: str, host: Optional[str]) -> bool:
        if "*" in self.origins or origin in self.origins:
            return True
        # The gateway's own pages (the playground) may always connect.
        return host is not None and origin.split("://", 1)[-1] == host


def credential_of(scope: Scope) -> Optional[str]:
    for name, value in scope.get("headers", ()):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
        elif name in (b"x-api-key", b"x-goog-api-key") and value:
            return value.decode("latin-1").strip()
    if is_gemini_path(scope) and scope.get("query_string"):
        keys = parse_qs(scope["query_string"].decode("latin-1")).get("key")
        if keys and keys[0].strip():
            return keys[0].strip()
    return None


def _header(scope: Scope, name: bytes) -> Optional[bytes]:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


class PolicyMiddleware:
    """Pure ASGI (no buffering of streams): see the module docstring."""

    def __init__(self, app: ASGIApp, layer: PolicyLayer) -> None:
        self.app = app
        self.layer = layer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        layer = self.layer
        method = scope.get("method", "GET") if scope["type"] == "http" else "GET"
        kind = classify(method, _path(scope), layer.public_paths)
        if kind == "public":
            await self.app(scope, receive, send)
            return
        try:
            await layer.ready()
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send, kind)
                return
            principal = self._principal(scope, kind)
        except TroupeError as err:
            await self._refuse(err, scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        token = PRINCIPAL.set(principal)
        try:
            await self._http(scope, receive, send, principal)
        finally:
            PRINCIPAL.reset(token)

    def _principal(self, scope: Scope, kind: str) -> Principal:
        layer = self.layer
        if not layer.auth_required():
            return ANONYMOUS
        token = credential_of(scope)
        if token is None:
            raise AuthenticationFailed(
                "No API key. Send 'Authorization: Bearer trp_...' (or 'x-api-key: trp_...'); "
                "an admin creates keys with `troupe keys create` or POST /admin/keys."
            )
        principal = layer.authenticate(token)
        if kind == "admin" and not principal.is_admin:
            raise AuthorizationFailed(
                f"This route needs an admin key; key {principal.key_id} has role "
                f"{principal.role!r}."
            )
        return principal

    async def _websocket(self, scope: Scope, receive: Receive, send: Send, kind: str) -> None:
        layer = self.layer
        origin = _header(scope, b"origin")
        if origin is not None:
            host = _header(scope, b"host")
            if not layer.origin_allowed(origin.decode("latin-1"),
                                        host.decode("latin-1") if host else None):
                logger.info("refused /ws from origin %s (not in auth.websocket_origins)",
                            origin.decode("latin-1")[:200])
                await send({"type": "websocket.close", "code": 4403,
                            "reason": "origin not allowed"})
                return
        state = scope.setdefault("state", {})
        state["policy"] = layer
        if layer.auth_required() and credential_of(scope) is None:
            state["auth_pending"] = True  # the session must get an `auth` message first
            await self.app(scope, receive, send)
            return
        try:
            principal = self._principal(scope, kind)
        except TroupeError as err:
            await send({"type": "websocket.close", "code": 4401 if err.status == 401 else 4403,
                        "reason": err.code})
            return
        state["principal"] = principal
        token = PRINCIPAL.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            PRINCIPAL.reset(token)

    async def _http(self, scope: Scope, receive: Receive, send: Send,
                    principal: Principal) -> None:
        layer = self.layer
        guard: Optional[IdempotencyGuard] = None
        admission = None
        try:
            raw_key = _header(scope, b"idempotency-key") if scope["method"] == "POST" else None
            if raw_key is not None and layer.settings.idempotency.enabled:
                idem_key = check_key(raw_key)
                body = await read_body(receive, layer.settings.gateway.max_body_bytes)
                if body is None:
                    return  # the client left
                receive = replay_receive(body, receive)
                if not is_stream_request(body):
                    guard = IdempotencyGuard(
                        layer.store, layer.settings.idempotency, layer.lock_s,
                        f"{principal.key_id}:{idem_key}",
                        IdempotencyGuard.fingerprint_of(scope, body))
                    record = await guard.claim()
                    if record is not None:
                        await guard.replay(record, send)
                        return
            if layer.limiter is not None:
                admission = await layer.limiter.admit(principal)
        except TroupeError as err:
            if guard is not None:
                await guard.abandon()
            await self._refuse(err, scope, receive, send)
            return
        tally = UsageTally()
        usage_token = USAGE.set(tally)
        if guard is not None:
            send = guard.wrap_send(send)
        if admission is not None:
            send = _with_headers(send, admission.headers)
        try:
            await self.app(scope, receive, send)
        finally:
            USAGE.reset(usage_token)
            if admission is not None and layer.limiter is not None:
                layer.limiter.finish(admission, tally.tokens)
            if guard is not None:
                await guard.abandon()  # no-op when the response was stored

    async def _refuse(self, err: TroupeError, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4401 if err.status == 401 else 4403,
                        "reason": err.code})
            return
        if self.layer.on_rejected is not None:
            self.layer.on_rejected("policy", err, scope.get("state", {}).get("request_id", ""))
        extra = {k.decode(): v.decode() for k, v in getattr(err, "rate_headers", ())}
        if err.status == 401:
            extra["WWW-Authenticate"] = 'Bearer realm="troupe"'
        await error_response(err, scope, extra)(scope, receive, send)


def _with_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = list(message.get("headers", ())) + headers
        await send(message)

    return wrapped

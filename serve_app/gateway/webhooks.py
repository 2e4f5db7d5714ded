"""Signed webhooks: signing, verification (for receivers), and URL safety.

Signature: ``Troupe-Signature: t=<unix seconds>,v1=<hex>`` where ``v1`` is
HMAC-SHA256(secret, ``f"{t}.".encode() + raw_body``). Receivers verify with
:func:`verify_signature` (constant-time compare, timestamp tolerance)::

    from serve_app.gateway.webhooks import verify_signature
    ok = verify_signature(secret, request_body_bytes, request.headers["Troupe-Signature"])

URL rules (:func:`check_webhook_url`): https only, plain http only to loopback hosts; no
user name or password, query or fragment; every address the host resolves to must be
public (private, link-local, multicast, reserved and unspecified ones are refused unless
their host or network is in the allow-list). Sending resolves again and connects only to
checked addresses (:class:`SafeResolver`), so a DNS answer that changes after the check
cannot redirect the request.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import socket
import time
from typing import Any, Iterable, Optional
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

__all__ = [
    "SIGNATURE_HEADER",
    "sign_payload",
    "verify_signature",
    "UnsafeWebhookURL",
    "check_webhook_url",
    "address_allowed",
    "SafeResolver",
]

SIGNATURE_HEADER = "Troupe-Signature"
DEFAULT_TOLERANCE_S = 300


def sign_payload(secret: str | bytes, body: bytes, timestamp: Optional[int] = None) -> str:
    """The ``Troupe-Signature`` header value for ``body``."""
    ts = int(time.time()) if timestamp is None else int(timestamp)
    key = secret.encode() if isinstance(secret, str) else secret
    digest = hmac.new(key, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={ts},v1={digest}"


def verify_signature(secret: str | bytes, body: bytes, header: Optional[str],
                     tolerance_s: float = DEFAULT_TOLERANCE_S,
                     now: Optional[float] = None) -> bool:
    """True when ``header`` signs ``body`` with ``secret`` and its timestamp is within
    ``tolerance_s`` of ``now`` (either way). Any malformed header is simply False."""
    if not header:
        return False
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(name, []).append(value)
    try:
        ts = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    current = time.time() if now is None else now
    if abs(current - ts) > tolerance_s:
        return False
    expected = sign_payload(secret, body, ts).split("v1=", 1)[1]
    # Any of several v1 values may match (a sender rotating secrets sends both).
    return any(hmac.compare_digest(expected, candidate) for candidate in fields.get("v1", []))


class UnsafeWebhookURL(ValueError):
    """The webhook URL breaks a rule; the message says which."""


def _allowed_by_list(ip: Any, host: str, allow: Iterable[str]) -> bool:
    for entry in allow:
        if entry == host:
            return True
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def address_allowed(address: str, host: str, scheme: str, allow: Iterable[str]) -> bool:
    """May a webhook for ``host`` connect to ``address``?"""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if ip.is_loopback:
        return True  # the caller's own machine (http allowed only here, checked by scheme)
    if _allowed_by_list(ip, host, allow):
        return True
    return not (ip.is_private or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified or (ip.version == 6 and ip.ipv4_mapped is not None
                                         and not ip.ipv4_mapped.is_global))


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UnsafeWebhookURL(f"the webhook host {host!r} does not resolve ({exc})") from None
    return sorted({str(info[4][0]) for info in infos})


def check_webhook_url(url: str, allow: Iterable[str] = (), resolve: bool = True) -> str:
    """Return ``url`` when it is safe to POST to, else raise :class:`UnsafeWebhookURL`."""
    allow = list(allow)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeWebhookURL(f"the webhook URL is malformed ({exc})") from None
    host = parts.hostname or ""
    if parts.scheme not in ("https", "http") or not host:
        raise UnsafeWebhookURL("the webhook URL must be https://host/path")
    if parts.username is not None or parts.password is not None:
        raise UnsafeWebhookURL("the webhook URL must not carry a user name or password")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise UnsafeWebhookURL("the webhook URL must not have a query (?...) or fragment (#...)")
    loopback_name = host == "localhost"
    if parts.scheme == "http":
        try:
            literal_loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            literal_loopback = False
        if not (loopback_name or literal_loopback):
            raise UnsafeWebhookURL("plain http is allowed only to loopback hosts; use https")
    if resolve:
        for address in _resolve(host, port or (443 if parts.scheme == "https" else 80)):
            if parts.scheme == "http" and not ipaddress.ip_address(address.split("%")[0]).is_loopback:
                raise UnsafeWebhookURL(f"{host} resolves to {address}, not loopback: use https")
            if not address_allowed(address, host, parts.scheme, allow):
                raise UnsafeWebhookURL(
                    f"the webhook host {host} resolves to {address}, a private or reserved "
                    "address; add it to batch.webhook_allow to permit it")
    return url


class SafeResolver(AbstractResolver):
    """An aiohttp resolver that drops addresses :func:`address_allowed` refuses, so the
    connection goes only to addresses checked at send time."""

    def __init__(self, scheme: str, allow: Iterable[str]) -> None:
        self._inner = DefaultResolver()
        self.scheme = scheme
        self.allow = list(allow)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        safe = [r for r in results if address_allowed(r["host"], host, self.scheme, self.allow)
                and (self.scheme == "https" or ipaddress.ip_address(r["host"]).is_loopback)]
        if not safe:
            raise OSError(f"{host} resolves only to refused addresses")
        return safe

    async def close(self) -> None:
        await self._inner.close()

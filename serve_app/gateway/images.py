"""Image input for vision models: admit, check and inline every image part of a request.

A request with images goes only to a model that declares ``vision`` (else a 400 naming the
models that do). ``data:`` URLs are decoded and size-checked; an http(s) URL is fetched by
the gateway only when its host is in ``gateway.image_url_allow``, connecting only to
addresses that pass the webhook rules (:func:`serve_app.gateway.webhooks.address_allowed`:
no private, link-local or reserved ones), and is inlined as a ``data:`` URL, so engines
never touch the network and see one kind of URL.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
from typing import Any, Iterable
from urllib.parse import urlsplit

from serve_app.errors import InvalidRequest
from serve_app.gateway.agent_checks import refuse_unsupported
from serve_app.protocol.internal import GenerationRequest, ImagePart

__all__ = ["admit_images", "check_data_url", "host_allowed"]

_FETCH_TIMEOUT_S = 10.0


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(message, param="image_url")


def check_data_url(url: str, max_bytes: int) -> str:
    """``url`` when it is a base64 ``data:image/...`` URL of at most ``max_bytes``."""
    head, sep, payload = url.partition(",")
    if not sep or not head.startswith("data:image/") or not head.endswith(";base64"):
        raise _bad("an inline image must be a data:image/<type>;base64,<data> URL")
    if len(payload) * 3 // 4 > max_bytes:
        raise _bad(f"the image is larger than the {max_bytes}-byte limit")
    try:
        base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise _bad("the data: URL's image is not valid base64") from None
    return url


def host_allowed(host: str, allow: Iterable[str]) -> bool:
    """Is ``host`` listed (exactly, or under a listed ``.domain``)?"""
    host = host.lower().rstrip(".")
    for entry in allow:
        entry = entry.lower()
        if host == entry or (entry.startswith(".") and host.endswith(entry)):
            return True
    return False


def _check_literal_address(host: str, scheme: str) -> None:
    """An IP-literal host skips the resolver, so check it here by the same rules."""
    from serve_app.gateway.webhooks import address_allowed

    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return
    if not address_allowed(host, "", scheme, ()) or (scheme == "http" and not ip.is_loopback):
        raise _bad(f"image URLs may not point at {host}, a private or reserved address "
                   "(plain http only to loopback)")


async def _fetch(url: str, allow: list[str], max_bytes: int) -> str:
    """Download an allowed image URL and return it as a data URL."""
    import aiohttp

    from serve_app.gateway.webhooks import SafeResolver

    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise _bad("an image URL must be a data: URL or an http(s) URL")
    if parts.username is not None or parts.password is not None:
        raise _bad("an image URL must not carry a user name or password")
    if not host_allowed(host, allow):
        raise _bad(f"image URLs from {host!r} are not allowed here; send the image inline as a "
                   "data: URL, or ask the operator to add the host to gateway.image_url_allow")
    _check_literal_address(host, parts.scheme)
    connector = aiohttp.TCPConnector(resolver=SafeResolver(parts.scheme, ()))
    timeout = aiohttp.ClientTimeout(total=_FETCH_TIMEOUT_S)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise _bad(f"fetching the image at {url} answered HTTP {response.status}")
                kind = response.headers.get("Content-Type", "").split(";")[0].strip()
                if not kind.startswith("image/"):
                    raise _bad(f"the URL {url} is not an image (Content-Type {kind or 'none'})")
                data = await response.content.read(max_bytes + 1)
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise _bad(f"the image at {url} could not be fetched ({type(exc).__name__})") from None
    if len(data) > max_bytes:
        raise _bad(f"the image at {url} is larger than the {max_bytes}-byte limit")
    return f"data:{kind};base64,{base64.b64encode(data).decode()}"


async def _inline(part: Any, allow: list[str], max_bytes: int) -> Any:
    if not isinstance(part, ImagePart):
        return part
    if part.url.startswith("data:"):
        return ImagePart(check_data_url(part.url, max_bytes), part.detail)
    return ImagePart(await _fetch(part.url, allow, max_bytes), part.detail)


async def admit_images(
    core: Any, model: Any, request: GenerationRequest, param: str = "messages"
) -> None:
    """Refuse images for a text-only model; check and inline them for a vision model.

    ``param`` is the request field that carries the turns (named in the 400). Agent fields
    a remote provider adapter cannot carry are refused here too (every route calls this).
    """
    refuse_unsupported(model, request, param)
    if not request.has_images():
        return
    if not model.vision:
        vision = sorted(m.id for m in core.models.values() if m.vision)
        raise InvalidRequest(
            f"Model {model.id!r} does not accept images (sent in '{param}'). Models here "
            "that do: "
            f"{', '.join(vision) or '(none)'}.",
            param=param,
            details={"vision_models": vision},
        )
    options = core.settings.gateway
    for message in request.messages or ():
        if message.has_images():
            parts = [await _inline(p, options.image_url_allow, options.max_image_bytes)
                     for p in message.parts]
            message.parts = tuple(parts)

"""A realtime session passed through to a provider's own realtime endpoint.

A model listed in ``realtime.proxy`` is a remote OpenAI engine model whose provider speaks
the Realtime protocol itself (``gpt-realtime``...). Its sessions are not run here: the
gateway opens a WebSocket to ``{base_url}/realtime?model={upstream model}`` with the
session actor's credential for that engine (``Authorization: Bearer``, read from the
current snapshot when the session starts), then relays every event both ways unchanged
until either side closes. Closing one side closes the other.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, MutableMapping, Optional
from urllib.parse import quote

import aiohttp

from serve_app.errors import AuthenticationFailed, InferenceFailed

__all__ = ["ProxyTarget", "proxy_target", "relay"]

#: Seconds to open the provider's WebSocket.
CONNECT_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class ProxyTarget:
    """Where a proxied session goes, and how it authenticates (``headers`` hold the key)."""

    url: str
    headers: dict[str, str] = field(repr=False)


def _ws_url(base_url: str, model: str) -> str:
    base = base_url.rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base[len("https://"):]
    elif base.startswith("http://"):
        base = "ws://" + base[len("http://"):]
    return f"{base}/realtime?model={quote(model)}"


async def proxy_target(engine: Any, credentials: Any) -> ProxyTarget:
    """The provider URL and auth header of a proxied model's remote OpenAI ``engine``.

    Raises:
        AuthenticationFailed: the session actor holds no credential for the engine.
    """
    credentials.register(engine.credential_name, engine.api_key_env)
    await credentials.start()
    credential = credentials.current().get(engine.credential_name)
    if credential is None:
        raise AuthenticationFailed(
            f"No credential {engine.credential_name!r} for the provider's realtime endpoint: set "
            f"${engine.api_key_env} or POST /admin/credentials.")
    headers = {"Authorization": f"Bearer {credential.secret}"}
    if engine.organization:
        headers["OpenAI-Organization"] = engine.organization
    return ProxyTarget(_ws_url(engine.base_url, engine.model), headers)


async def relay(receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
                send_text: Callable[[str], Awaitable[None]], target: ProxyTarget,
                session: Optional[aiohttp.ClientSession] = None) -> None:
    """Relay text events between the client (ASGI ``receive`` / ``send_text``) and ``target``.

    Raises:
        AuthenticationFailed: the provider refused the credential (401/403).
        InferenceFailed: the provider could not be reached or refused the connection.
    """
    own = session is None
    http = session or aiohttp.ClientSession()
    try:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                upstream = await http.ws_connect(target.url, headers=target.headers, max_msg_size=0)
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in (401, 403):
                raise AuthenticationFailed(
                    f"The provider refused the credential for its realtime endpoint ({exc.status}).") from None
            raise InferenceFailed(f"The provider's realtime endpoint answered {exc.status}.") from None
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise InferenceFailed(f"Could not reach the provider's realtime endpoint: {exc}.") from None
        async with upstream:
            await _pump_both(receive, send_text, upstream)
    finally:
        if own:
            await http.close()


async def _pump_both(receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
                     send_text: Callable[[str], Awaitable[None]],
                     upstream: aiohttp.ClientWebSocketResponse) -> None:
    async def client_to_provider() -> None:
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await upstream.send_str(message["text"])

    async def provider_to_client() -> None:
        async for message in upstream:
            if message.type == aiohttp.WSMsgType.TEXT:
                await send_text(message.data)
            elif message.type in (aiohttp.WSMsgType.ERROR, aiohttp.WSMsgType.CLOSE):
                return

    tasks = [asyncio.create_task(client_to_provider()), asyncio.create_task(provider_to_client())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()  # a failure on either side ends the session with its error
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)

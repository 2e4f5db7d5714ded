"""A gateway app whose models run inside it (``run_in: gateway``), served in process through
httpx's ASGI transport: the Gateway deployment's own wiring without Ray."""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import httpx

from serve_app.build.app import build_fastapi_app
from serve_app.build.in_gateway import InGatewayModels
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.model_state import MemoryModelState


@asynccontextmanager
async def in_gateway_client(settings: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client on the gateway; ``client.hosted`` and ``client.core`` for inspection."""
    hosted = InGatewayModels(settings)
    await hosted.start()
    core = GatewayCore(settings, hosted.handles, model_state=MemoryModelState())
    transport = httpx.ASGITransport(app=build_fastapi_app(core))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw", timeout=30) as client:
            client.hosted = hosted  # type: ignore[attr-defined]
            client.core = core  # type: ignore[attr-defined]
            yield client
    finally:
        await hosted.shutdown()

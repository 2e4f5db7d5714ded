"""Admin routes for LoRA adapters: ``POST /models/{base}/adapters`` registers an adapter
folder at run time, ``DELETE /models/{base}/adapters/{id}`` drops it, ``GET`` lists them
(each with ``replicas``: the model replicas Serve's router in this gateway replica knows
hold it, the ids unary answers carry in ``x-troupe-replica``).

The adapter is checked when it is registered (missing files, rank too large, another base
model: 400), kept in the store, and loaded by a replica on its first request.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from serve_app.gateway.adapters import adapter_card, serve_placement
from serve_app.http.admin_auth import require_admin
from serve_app.http.plumbing import JSONResponse, parse_body, read_json
from serve_app.settings.adapters import ADAPTER_ID_PATTERN

__all__ = ["build_adapters_router", "ADAPTER_EXAMPLE"]

ADAPTER_EXAMPLE = '{"id": "support-bot", "path": "/srv/adapters/support-bot"}'


class AdapterBody(BaseModel):
    """A registration: the adapter's id and its local folder."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., pattern=ADAPTER_ID_PATTERN)
    path: str = Field(..., min_length=1, max_length=4096)


def build_adapters_router(core: Any) -> APIRouter:
    """The adapter admin routes over one GatewayCore (its ``adapters`` catalog)."""
    router = APIRouter()
    admin_env = core.settings.gateway.admin_key_env
    catalog = core.adapters

    @router.post("/models/{base:path}/adapters")
    async def register_adapter(base: str, request: Request) -> JSONResponse:
        require_admin(request.headers, admin_env)
        body = parse_body(AdapterBody, await read_json(request, 16 * 1024, ADAPTER_EXAMPLE),
                          ADAPTER_EXAMPLE)
        ref = await catalog.register(base, body.id, body.path)
        return JSONResponse(adapter_card(ref, int(core.started_at)), status_code=201)

    @router.get("/models/{base:path}/adapters")
    async def list_adapters(base: str, request: Request) -> JSONResponse:
        require_admin(request.headers, admin_env)
        catalog.base_model(base)
        await catalog.refresh()
        placement = serve_placement(core.dispatcher.handles.get(base)) or {}
        cards = [{**adapter_card(r, int(core.started_at)), "replicas": placement.get(r.adapter_id, [])}
                 for r in catalog.cards() if r.base == base]
        return JSONResponse({"object": "list", "data": cards})

    @router.delete("/models/{base:path}/adapters/{adapter_id}")
    async def drop_adapter(base: str, adapter_id: str, request: Request) -> JSONResponse:
        require_admin(request.headers, admin_env)
        ref = await catalog.drop(base, adapter_id)
        return JSONResponse({"id": ref.model_id, "deleted": True})

    return router

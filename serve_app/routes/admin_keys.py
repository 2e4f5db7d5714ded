"""Admin routes for API keys: ``POST /admin/keys``, ``GET /admin/keys``,
``DELETE /admin/keys/{id}``. The policy layer lets only admin keys reach them."""

from __future__ import annotations

import time
from typing import Any, Literal, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import NotFound
from serve_app.http.plumbing import JSONResponse, parse_body, read_json
from serve_app.policies.keys import mint_key

__all__ = ["build_admin_keys_router", "KEY_EXAMPLE"]

KEY_EXAMPLE = '{"name": "ci", "role": "models", "models": ["mock-5ms"], "limits": {"requests_per_minute": 60}}'


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200)
    role: Literal["workspace", "models", "admin"] = "workspace"
    models: list[str] = Field(default_factory=list)
    limits: dict[str, Optional[int]] = Field(default_factory=dict)
    expires_in_s: Optional[float] = Field(None, gt=0)


def build_admin_keys_router(layer: Any) -> APIRouter:
    router = APIRouter(prefix="/admin/keys")
    max_body = layer.settings.gateway.max_body_bytes

    @router.post("")
    async def create(request: Request) -> JSONResponse:
        body = parse_body(CreateKey, await read_json(request, max_body, KEY_EXAMPLE), KEY_EXAMPLE)
        now = time.time()
        token, row = mint_key(
            body.name, body.role, tuple(body.models), body.limits,
            None if body.expires_in_s is None else now + body.expires_in_s, now,
        )
        await layer.store.key_create(row)
        await layer.keys.refresh()  # this replica at once; the others within key_refresh_s
        return JSONResponse({**row.public(), "key": token,
                             "note": "The key is shown only now; store it safely."},
                            status_code=201)

    @router.get("")
    async def list_keys() -> JSONResponse:
        rows = await layer.store.key_list()
        return JSONResponse({"object": "list", "data": [r.public() for r in rows]})

    @router.delete("/{key_id}")
    async def revoke(key_id: str) -> JSONResponse:
        if not await layer.store.key_revoke(key_id, time.time()):
            raise NotFound(f"No active API key {key_id!r}. List keys with GET /admin/keys.")
        await layer.keys.refresh()
        return JSONResponse({"id": key_id, "revoked": True})

    return router

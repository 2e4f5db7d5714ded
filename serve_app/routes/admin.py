"""Admin routes: ``POST /admin/credentials`` (rotate a provider key), ``GET
/admin/credentials`` (fingerprints only).

The key goes to the session actor, which validates it, persists it through the store and
publishes a new snapshot; the answer holds only the key's fingerprint and the snapshot
version, never the key.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from serve_app.errors import NotFound, TroupeError, as_troupe_error
from serve_app.http.admin_auth import require_admin
from serve_app.http.plumbing import JSONResponse, parse_body, read_json

__all__ = ["build_admin_router", "CREDENTIALS_EXAMPLE"]

CREDENTIALS_EXAMPLE = '{"provider": "openai", "api_key": "sk-..."}'


class CredentialBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    provider: str = Field(..., min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._-]+$")
    api_key: str = Field(..., min_length=1, max_length=4096)


def build_admin_router(core: Any, session_actor: Callable[[], Optional[Any]]) -> APIRouter:
    """``session_actor`` returns the actor handle (None when no remote model is configured)."""
    router = APIRouter()
    admin_env = core.settings.gateway.admin_key_env

    def actor_or_error() -> Any:
        actor = session_actor()
        if actor is None:
            raise NotFound(
                "No remote provider model is configured, so there are no credentials to "
                "manage. Add a model with an openai, anthropic or gemini engine.",
            )
        return actor

    async def call(method: str, *args: Any) -> Any:
        try:
            return await getattr(actor_or_error(), method).remote(*args)
        except TroupeError:
            raise
        except Exception as exc:  # RayTaskError wrapping the actor's TroupeError
            raise as_troupe_error(getattr(exc, "cause", None) or exc) from None

    @router.post("/admin/credentials")
    async def set_credentials(request: Request) -> JSONResponse:
        require_admin(request.headers, admin_env)
        data = await read_json(request, 16 * 1024, CREDENTIALS_EXAMPLE)
        body = parse_body(CredentialBody, data, CREDENTIALS_EXAMPLE)
        result = await call("set_credential", body.provider, body.api_key)
        return JSONResponse({
            "provider": result["name"], "fingerprint": result["fingerprint"],
            "version": result["version"], "source": result["source"],
            "updated_at": result["updated_at"],
        })

    @router.get("/admin/credentials")
    async def list_credentials(request: Request) -> JSONResponse:
        require_admin(request.headers, admin_env)
        return JSONResponse(await call("status"))

    return router

"""Observability routes: GET /metrics, GET /v1/usage, POST /metrics/custom, GET /traces.

All of them read the metrics actor (off the request path of inference routes). When
metrics are disabled in config they answer 404 saying so.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Optional

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from serve_app.errors import InvalidRequest, NotFound, Timeout, TroupeError, as_troupe_error
from serve_app.gateway.core import GatewayCore
from serve_app.http.plumbing import JSONResponse, parse_body, read_json
from serve_app.policies.context import current_principal

__all__ = ["build_observability_router", "GROUP_BY", "CUSTOM_EXAMPLE"]

GROUP_BY = ("model", "provider", "key", "tier", "route")
CUSTOM_EXAMPLE = (
    '{"name": "queue_jobs", "kind": "gauge", "value": 3, "labels": {"queue": "emails"}}'
)
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ACTOR_TIMEOUT_S = 10.0


class CustomMetric(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=100)
    kind: str = Field(..., pattern="^(gauge|counter)$")
    value: float
    labels: dict[str, str] = Field(default_factory=dict)


def _number(request: Request, name: str) -> Optional[float]:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(
            f"Query parameter {name!r} must be a number (unix seconds), got {raw!r}. "
            "Example: /v1/usage?group_by=model&window_s=3600",
            param=name,
        ) from None
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest(f"Query parameter {name!r} must be a finite number >= 0.", param=name)
    return value


def _usage_query(request: Request) -> tuple[str, float, float]:
    """``group_by`` and the window (``start``, ``end``; default the last day) of /v1/usage."""
    group_by = request.query_params.get("group_by", "model")
    if group_by not in GROUP_BY:
        raise InvalidRequest(
            f"group_by must be one of {', '.join(GROUP_BY)}; got {group_by!r}. "
            "Example: /v1/usage?group_by=model&window_s=3600",
            param="group_by",
        )
    now = time.time()
    end = _number(request, "end") or now
    window = _number(request, "window_s")
    start = _number(request, "start")
    if start is None:
        start = end - (window if window is not None else 86_400.0)
    if start >= end:
        raise InvalidRequest("start must be before end.", param="start")
    return group_by, start, end


def build_observability_router(core: GatewayCore, metrics_actor: Any) -> APIRouter:
    """Routes over the metrics actor's handle (``None`` when metrics are disabled)."""
    router = APIRouter()
    max_body = core.settings.gateway.max_body_bytes

    async def call(method: str, *args: Any) -> Any:
        if metrics_actor is None:
            raise NotFound(
                "Metrics are disabled on this gateway (config: metrics.enabled is false)."
            )
        try:
            async with asyncio.timeout(ACTOR_TIMEOUT_S):
                return await getattr(metrics_actor, method).remote(*args)
        except TimeoutError:
            raise Timeout(
                f"The metrics actor did not answer within {ACTOR_TIMEOUT_S:.0f}s; retry shortly.",
                retry_after_s=5,
            ) from None
        except TroupeError as exc:
            raise as_troupe_error(exc) from None

    @router.get("/metrics")
    async def prometheus() -> Response:
        return Response(await call("prometheus"), media_type=PROMETHEUS_CONTENT_TYPE)

    @router.get("/v1/usage")
    async def usage(request: Request) -> JSONResponse:
        group_by, start, end = _usage_query(request)
        principal = current_principal()
        if principal is None or principal.is_admin:
            return JSONResponse(await call("usage", start, end, group_by))
        # A non-admin key sees its own usage only.
        return JSONResponse(await call("usage", start, end, group_by, principal.key_id))

    @router.post("/metrics/custom")
    async def custom(request: Request) -> JSONResponse:
        body = parse_body(
            CustomMetric, await read_json(request, max_body, CUSTOM_EXAMPLE), CUSTOM_EXAMPLE
        )
        await call("record_custom", body.name, body.kind, body.value, body.labels)
        return JSONResponse({"ok": True, "name": body.name})

    @router.get("/traces")
    async def traces(request: Request) -> JSONResponse:
        limit = _number(request, "limit")
        n = 20 if limit is None else max(1, min(1000, int(limit)))
        return JSONResponse({"object": "list", "data": await call("traces", n)})

    return router

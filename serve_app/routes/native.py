"""Native REST routes: /health, /models, /inference, /inference/stream."""

from __future__ import annotations

import time
from typing import Any, AsyncIterator

import orjson
from fastapi import APIRouter, Request
from sse_starlette import ServerSentEvent

from serve_app.gateway.adapters import adapter_card
from serve_app.gateway.core import VERSION, GatewayCore
from serve_app.gateway.deadline import apply_start_within
from serve_app.errors import TroupeError, as_troupe_error
from serve_app.http.plumbing import JSONResponse, error_event_data, parse_body, read_json, request_id_of
from serve_app.gateway.metering import RequestInfo
from serve_app.protocol.internal import GenerationRequest, TextChunk
from serve_app.protocol.native import INFERENCE_EXAMPLE, InferenceRequest
from serve_app.protocol.openai import unknown_fields
from serve_app.routes.openai_api import peek_stream
from serve_app.http.sse import SSEResponse

__all__ = ["build_native_router", "native_request"]


def native_request(core: GatewayCore, body: InferenceRequest, request_id: str) -> GenerationRequest:
    """The internal request for a native body (REST and WebSocket share the fields)."""
    request = core.build_request(
        request_id,
        messages=body.messages,
        prompt=body.prompt,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_tuple(),
    )
    if body.start_within is not None or body.service_tier is not None:
        apply_start_within(core.resolve(body.model), request, body.start_within,
                           body.service_tier)
    return request


def build_native_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()
    max_body = core.settings.gateway.max_body_bytes

    @router.get("/health")
    async def health() -> JSONResponse:
        stats = await core.model_stats()
        models = []
        for model_id, model in core.models.items():
            s = stats.get(model_id, {})
            models.append(
                {
                    "id": model_id,
                    "loaded": s.get("status") == "ok" and model_id not in core.unloaded,
                    "status": "unloaded" if model_id in core.unloaded else s.get("status", "unavailable"),
                    "engine": model.engine.type,
                    "active_requests": s.get("active_requests"),
                    "reason": s.get("reason"),
                    **({"remote": s["remote"]} if "remote" in s else {}),
                }
            )
        # a model unloaded on purpose (POST /models/{id}/unload) or scaled to zero by its
        # autoscaling policy does not make the gateway unhealthy
        healthy = all(m["loaded"] or m["status"] in ("unloaded", "scaled_to_zero") for m in models)
        return JSONResponse(
            {
                "status": "ok" if healthy else "degraded",
                "version": VERSION,
                "uptime_s": round(time.time() - core.started_at, 3),
                "models_loaded": sum(1 for m in models if m["loaded"]),
                "in_flight_requests": core.in_flight,
                "models": models,
            },
            status_code=200 if healthy else 503,
        )

    @router.get("/models")
    async def models() -> JSONResponse:
        stats = await core.model_stats()
        data = []
        for model_id, model in core.models.items():
            s = stats.get(model_id, {})
            opts = model.deployment
            data.append(
                {
                    "id": model_id,
                    "modality": model.modality,
                    "loaded": s.get("status") == "ok" and model_id not in core.unloaded,
                    "capabilities": core.capabilities(model),
                    **core.modality_card(model),
                    "context_length": s.get("context_length"),
                    "engine": model.engine.type,
                    "description": model.description,
                    "default_max_tokens": model.default_max_tokens,
                    "resources": {
                        **opts.ray_actor_options.to_ray(),
                        "max_ongoing_requests": opts.max_ongoing_requests,
                        "replicas": opts.num_replicas
                        if opts.autoscaling is None
                        else opts.autoscaling.model_dump(),
                    },
                    "pricing": model.pricing.model_dump(),
                }
            )
        data.extend(adapter_card(ref, int(core.started_at)) for ref in core.adapters.cards())
        return JSONResponse({"object": "list", "data": data})

    async def _parse(request: Request) -> InferenceRequest:
        body = parse_body(
            InferenceRequest,
            await read_json(request, max_body, INFERENCE_EXAMPLE),
            INFERENCE_EXAMPLE,
        )
        core.note_unknown_fields(request.url.path, unknown_fields(body))
        core.resolve(body.model)
        return body

    def _request(body: InferenceRequest, request_id: str) -> GenerationRequest:
        return native_request(core, body, request_id)

    @router.post("/inference")
    async def inference(request: Request) -> JSONResponse:
        body = await _parse(request)
        request_id = request_id_of(request)
        result = await core.complete(body.model, _request(body, request_id), RequestInfo("/inference"))
        return JSONResponse(
            {
                "id": request_id,
                "model": body.model,
                "text": result.text,
                "finish_reason": result.finish_reason,
                "usage": result.usage(),
                "request_id": request_id,
            }
        )

    @router.post("/inference/stream")
    async def inference_stream(request: Request) -> SSEResponse:
        body = await _parse(request)
        request_id = request_id_of(request)
        first, rest = await peek_stream(
            core.stream(body.model, _request(body, request_id), RequestInfo("/inference/stream", True))
        )
        return SSEResponse(_native_events(first, rest, request_id),
                           keepalive_s=core.settings.gateway.sse_keepalive_s)

    return router


async def _native_events(
    first: TextChunk, rest: AsyncIterator[TextChunk], request_id: str
) -> AsyncIterator[Any]:
    """``{"token", "index"}`` events, then ``{"done": true, "finish_reason", "usage"}``.

    ``index`` counts tokens: a delta that carries several tokens has the index of its
    first token. An error after the stream started is a final ``event: error``.
    """
    index = 0
    chunk = first
    try:
        while True:
            if chunk.text:
                yield orjson.dumps({"token": chunk.text, "index": index}).decode()
            index += chunk.num_tokens
            if chunk.finish_reason is not None:
                yield orjson.dumps(
                    {"done": True, "finish_reason": chunk.finish_reason, "usage": chunk.usage()}
                ).decode()
                return
            chunk = await rest.__anext__()
    except StopAsyncIteration:
        return
    except TroupeError as exc:
        yield ServerSentEvent(
            data=error_event_data(as_troupe_error(exc), request_id, openai=False), event="error"
        )
    finally:
        await rest.aclose()

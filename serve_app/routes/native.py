"""Native REST routes: /health, /models, /inference, /inference/stream."""

from __future__ import annotations

import time
from typing import Any, AsyncGenerator

import orjson
from fastapi import APIRouter, Request
from sse_starlette import ServerSentEvent

from serve_app.errors import InvalidRequest, TroupeError, as_troupe_error
from serve_app.gateway.adapters import adapter_card
from serve_app.gateway.core import VERSION, GatewayCore
from serve_app.gateway.deadline import apply_start_within
from serve_app.gateway.images import admit_images
from serve_app.gateway.metering import RequestInfo
from serve_app.http.plumbing import JSONResponse, error_event_data, parse_body, read_json, request_id_of
from serve_app.http.sse import SSEResponse
from serve_app.protocol.internal import GenerationRequest, TextChunk
from serve_app.protocol.native import INFERENCE_EXAMPLE, InferenceRequest, logprobs_out, tool_call_out
from serve_app.protocol.openai import unknown_fields
from serve_app.protocol.openai_tools import (
    check_logit_bias,
    to_response_format,
    to_tool_choice,
    to_tool_specs,
)
from serve_app.routes.openai_api import peek_stream
from serve_app.routes.text_common import apply_tools

__all__ = ["build_native_router", "native_request"]


async def native_request(
    core: GatewayCore, body: InferenceRequest, request_id: str
) -> GenerationRequest:
    """The internal request for a native body (REST, WebSocket and batch share the fields;
    the one place that translates them)."""
    model = core.resolve(body.model)
    request = core.build_request(
        request_id,
        prompt=body.prompt,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_tuple(),
    )
    if body.messages is not None:
        request.messages = [m.internal() for m in body.messages]
    request.raw = body.raw
    sampling = request.sampling
    sampling.presence_penalty = body.presence_penalty or 0.0
    sampling.frequency_penalty = body.frequency_penalty or 0.0
    sampling.logit_bias = check_logit_bias(body.logit_bias)
    sampling.logprobs = (body.top_logprobs or 0) if body.logprobs else None
    apply_tools(request, lambda: to_tool_specs(body.tools), to_tool_choice(body.tool_choice),
                body.parallel_tool_calls is not False)
    try:
        request.response_format = to_response_format(body.response_format)
    except ValueError as exc:
        raise InvalidRequest(f"Invalid response_format: {exc}", param="response_format") from None
    if body.start_within is not None or body.service_tier is not None:
        apply_start_within(model, request, body.start_within, body.service_tier)
    await admit_images(core, model, request)
    return request


def build_native_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()
    max_body = core.settings.gateway.max_body_bytes

    @router.get("/health")
    async def health() -> JSONResponse:
        return await _health(core)

    @router.get("/models")
    async def models() -> JSONResponse:
        return await _models(core)

    async def _parse(request: Request) -> InferenceRequest:
        body = parse_body(
            InferenceRequest,
            await read_json(request, max_body, INFERENCE_EXAMPLE),
            INFERENCE_EXAMPLE,
        )
        core.note_unknown_fields(request.url.path, unknown_fields(body))
        core.resolve(body.model)
        return body

    @router.post("/inference")
    async def inference(request: Request) -> JSONResponse:
        body = await _parse(request)
        request_id = request_id_of(request)
        gen = await native_request(core, body, request_id)
        result = await core.complete(body.model, gen, RequestInfo("/inference"))
        out: dict[str, Any] = {
            "id": request_id,
            "model": body.model,
            "text": result.text,
            "finish_reason": result.finish_reason,
            "usage": result.usage(),
            "request_id": request_id,
        }
        if result.tool_calls:
            out["tool_calls"] = [tool_call_out(c) for c in result.tool_calls]
        if body.logprobs:
            out["logprobs"] = logprobs_out(result.logprobs, body.top_logprobs or 0)
        return JSONResponse(out)

    @router.post("/inference/stream")
    async def inference_stream(request: Request) -> SSEResponse:
        body = await _parse(request)
        request_id = request_id_of(request)
        gen = await native_request(core, body, request_id)
        first, rest = await peek_stream(
            core.stream(body.model, gen, RequestInfo("/inference/stream", True))
        )
        return SSEResponse(_native_events(first, rest, request_id, body.top_logprobs or 0),
                           keepalive_s=core.settings.gateway.sse_keepalive_s)

    return router


async def _health(core: GatewayCore) -> JSONResponse:
    """``GET /health``: every model's state; 503 when one that should serve does not."""
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
                **({"queue": s["queue"]} if "queue" in s else {}),
                # LoRA: the adapters of the replica that answered (loaded, loads, evictions)
                **({"replica": s["replica"], "adapters": s["adapters"]} if "adapters" in s else {}),
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


async def _models(core: GatewayCore) -> JSONResponse:
    """``GET /models``: the native envelope ``{"models": [...]}``, every model with its
    state, capabilities, resources and pricing."""
    stats = await core.model_stats()
    data = []
    for model_id, model in core.models.items():
        s = stats.get(model_id, {})
        opts = model.deployment
        data.append(
            {
                "id": model_id,
                "name": model.description or model_id,
                "type": model.modality,
                "size_bytes": s.get("size_bytes"),
                "modality": model.modality,
                "loaded": s.get("status") == "ok" and model_id not in core.unloaded,
                "context_size": s.get("context_length"),
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
    return JSONResponse({"models": data})


async def _native_events(
    first: TextChunk, rest: AsyncGenerator[TextChunk, None], request_id: str, top: int
) -> AsyncGenerator[Any, None]:
    """``{"token", "index"}`` events (with ``logprobs`` when asked), ``{"tool_call": {...}}``
    fragments, then ``{"done": true, "finish_reason", "usage"}``.

    ``index`` counts tokens: a delta that carries several tokens has the index of its
    first token. An error after the stream started is a final ``event: error``.
    """
    index = 0
    chunk = first
    try:
        while True:
            if chunk.text:
                event: dict[str, Any] = {"token": chunk.text, "index": index}
                if chunk.logprobs is not None:
                    event["logprobs"] = logprobs_out(chunk.logprobs, top)
                yield orjson.dumps(event).decode()
            for delta in chunk.tool_calls or ():
                yield orjson.dumps({"tool_call": tool_call_out(delta)}).decode()
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

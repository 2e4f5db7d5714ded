"""OpenAI-compatible routes under ``/v1``: models, chat completions, completions.

Thin: parse -> translate -> one handle call -> encode. Stream chunks are encoded with
orjson from small dicts (no pydantic on the way out) and flushed as soon as they exist.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, AsyncGenerator, Callable, Optional

from fastapi import APIRouter, Request

from serve_app.errors import InvalidRequest
from serve_app.gateway.adapters import adapter_card, replica_header
from serve_app.gateway.agent_checks import refuse_unsupported
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.deadline import apply_start_within
from serve_app.gateway.fanout import complete_all, fan_out, stream_all
from serve_app.gateway.images import admit_images
from serve_app.gateway.metering import RequestInfo
from serve_app.http.plumbing import JSONResponse, parse_body, read_json, request_id_of
from serve_app.http.sse import SSEResponse
from serve_app.protocol.field_policy import check_fields
from serve_app.protocol.internal import GenerationRequest, TextChunk
from serve_app.protocol.openai import (
    CHAT_EXAMPLE,
    COMPLETION_EXAMPLE,
    ChatCompletionRequest,
    CompletionRequest,
    unknown_fields,
)
from serve_app.protocol.openai_tools import (
    chat_logprobs_out,
    check_logit_bias,
    completion_logprobs_out,
    to_response_format,
    to_tool_choice,
    to_tool_specs,
    tool_calls_out,
)
from serve_app.routes.openai_stream import chat_events, completion_events
from serve_app.routes.text_common import apply_tools
from serve_app.settings import ModelConfig

__all__ = ["build_openai_router", "peek_stream", "chat_request", "completion_requests"]


async def peek_stream(chunks: AsyncGenerator[Any, None]) -> tuple[Any, AsyncGenerator[Any, None]]:
    """Await the first chunk so errors before any output still get a real status code."""
    try:
        first = await chunks.__anext__()
    except BaseException:
        await chunks.aclose()
        raise
    return first, chunks


def _model_card(model_id: str, created: int, core: Optional[GatewayCore] = None) -> dict[str, Any]:
    adapter = core.adapters.split(model_id) if core is not None else None
    if adapter is not None:  # a LoRA adapter on a base model (issue 19)
        return adapter_card(adapter, created)
    card = {"id": model_id, "object": "model", "created": created, "owned_by": "troupe"}
    if core is not None:  # Troupe extension: what the model does
        model = core.models[model_id]
        card["modality"] = model.modality
        card["capabilities"] = core.capabilities(model)
    return card


def _admit(
    core: GatewayCore,
    route: str,
    body: ChatCompletionRequest | CompletionRequest,
    request_id: str,
) -> tuple[ModelConfig, GenerationRequest]:
    """The checks every OpenAI text route makes, then the internal request (no input yet)."""
    core.note_unknown_fields(route, check_fields(route, unknown_fields(body), body.model_extra or {}))
    model = core.resolve(body.model)
    request = core.build_request(
        request_id,
        max_tokens=body.output_limit(),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_tuple(),
    )
    sampling = request.sampling
    sampling.presence_penalty = body.presence_penalty or 0.0
    sampling.frequency_penalty = body.frequency_penalty or 0.0
    sampling.logit_bias = check_logit_bias(body.logit_bias)
    apply_start_within(model, request, body.start_within, body.service_tier)
    return model, request


def _invalid(param: str, fn: Callable[[], Any]) -> Any:
    """``fn()``, with a ValueError turned into a 400 naming ``param``."""
    try:
        return fn()
    except ValueError as exc:
        raise InvalidRequest(f"Invalid {param}: {exc}", param=param) from None


async def chat_request(
    core: GatewayCore, body: ChatCompletionRequest, request_id: str
) -> GenerationRequest:
    """A chat completion body in the internal vocabulary (the one place that translates)."""
    model, request = _admit(core, "/v1/chat/completions", body, request_id)
    request.messages = [m.internal() for m in body.messages]
    apply_tools(request, lambda: to_tool_specs(body.tools), to_tool_choice(body.tool_choice),
                body.parallel_tool_calls is not False)
    request.response_format = _invalid(
        "response_format", lambda: to_response_format(body.response_format))
    request.sampling.logprobs = body.logprobs_k()
    request.session_key = body.prompt_cache_key
    await admit_images(core, model, request)
    return request


def completion_requests(
    core: GatewayCore, body: CompletionRequest, request_id: str
) -> tuple[list[GenerationRequest], list[str]]:
    """One internal request per prompt (completions are raw text), and each one's echo."""
    model, base = _admit(core, "/v1/completions", body, request_id)
    base.raw = True
    base.sampling.logprobs = body.logprobs
    if body.echo and body.logprobs is not None:
        base.sampling.prompt_logprobs = body.logprobs
    prompts = body.prompts()
    requests, echoes = [], []
    for i, prompt in enumerate(prompts):
        one = base if len(prompts) == 1 else dataclasses.replace(
            base, request_id=f"{request_id}-p{i}", sampling=dataclasses.replace(base.sampling))
        if isinstance(prompt, str):
            one.prompt = prompt
            echoes.append(prompt if body.echo else "")
        else:  # the engine echoes a token-id prompt (only it can detokenize)
            one.prompt_token_ids = prompt
            one.sampling.echo = bool(body.echo)
            echoes.append("")
        refuse_unsupported(model, one, "prompt")  # what the model's provider cannot carry
        requests.append(one)
    return requests, echoes


def _chat_choice(index: int, result: TextChunk, top: int) -> dict[str, Any]:
    calls = tool_calls_out(result.tool_calls)
    message: dict[str, Any] = {
        "role": "assistant",
        "content": result.text if result.text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    return {"index": index, "message": message,
            "logprobs": chat_logprobs_out(result.logprobs, top),
            "finish_reason": result.finish_reason}


def _usage(results: list[TextChunk], per_prompt: int) -> dict[str, Any]:
    prompt = sum(r.prompt_tokens for i, r in enumerate(results) if i % per_prompt == 0)
    cached = sum(r.cached_tokens for i, r in enumerate(results) if i % per_prompt == 0)
    completion = sum(r.completion_tokens for r in results)
    usage: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                             "total_tokens": prompt + completion}
    if cached:  # a provider's prompt cache or a local engine's prefix cache served them
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _add_model_routes(router: APIRouter, core: GatewayCore) -> None:
    """``GET /v1/models`` and ``GET /v1/models/{id}``."""
    created = int(core.started_at)

    @router.get("/models")
    async def list_models() -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": [_model_card(mid, created, core) for mid in core.models]
             + [adapter_card(ref, created) for ref in core.adapters.cards()]}
        )

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        core.resolve(model_id)
        return JSONResponse(_model_card(model_id, created, core))


def _add_chat_route(router: APIRouter, core: GatewayCore, max_body: int) -> None:
    """``POST /v1/chat/completions``: unary or streamed, one engine request per choice."""

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(
            ChatCompletionRequest, await read_json(request, max_body, CHAT_EXAMPLE), CHAT_EXAMPLE
        )
        request_id = request_id_of(request)
        gen = await chat_request(core, body, request_id)
        n = body.n or 1
        requests = fan_out(gen, n)
        completion_id = "chatcmpl-" + request_id.removeprefix("req_").replace("-", "")
        now = int(time.time())
        info = RequestInfo("/v1/chat/completions", stream=bool(body.stream))
        top = body.top_logprobs or 0
        if body.stream:
            first, rest = await peek_stream(stream_all(core, body.model, requests, info))
            return SSEResponse(
                chat_events(completion_id, now, body.model, body.include_usage(), top,
                            first, rest, n, request_id),
                keepalive_s=core.settings.gateway.sse_keepalive_s)
        results = await complete_all(core, body.model, requests, info)
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": now,
                "model": body.model,
                "choices": [_chat_choice(i, r, top) for i, r in enumerate(results)],
                "usage": _usage(results, n),
            },
            headers=replica_header(results[0]),
        )


def _add_completions_route(router: APIRouter, core: GatewayCore, max_body: int) -> None:
    """``POST /v1/completions``: every prompt shape, one engine request per prompt and choice."""

    @router.post("/completions")
    async def completions(request: Request):
        body = parse_body(
            CompletionRequest,
            await read_json(request, max_body, COMPLETION_EXAMPLE),
            COMPLETION_EXAMPLE,
        )
        request_id = request_id_of(request)
        prompts, echoes = completion_requests(core, body, request_id)
        n = body.n or 1
        requests = [r for p in prompts for r in fan_out(p, n)]
        completion_id = "cmpl-" + request_id.removeprefix("req_").replace("-", "")
        now = int(time.time())
        info = RequestInfo("/v1/completions", stream=bool(body.stream))
        if body.stream:
            first, rest = await peek_stream(stream_all(core, body.model, requests, info))
            return SSEResponse(
                completion_events(completion_id, now, body.model, body.include_usage(), echoes,
                                  n, body.logprobs, first, rest, request_id),
                keepalive_s=core.settings.gateway.sse_keepalive_s)
        results = await complete_all(core, body.model, requests, info)
        choices = []
        for i, r in enumerate(results):
            echo = echoes[i // n]
            choices.append({
                "index": i,
                "text": echo + r.text,
                "logprobs": None if body.logprobs is None
                else completion_logprobs_out(r.logprobs, body.logprobs, 0 if r.prompt_logprobs
                                             else len(echo), r.prompt_logprobs),
                "finish_reason": r.finish_reason,
            })
        return JSONResponse(
            {
                "id": completion_id,
                "object": "text_completion",
                "created": now,
                "model": body.model,
                "choices": choices,
                "usage": _usage(results, n),
            },
            headers=replica_header(results[0]),
        )


def build_openai_router(core: GatewayCore) -> APIRouter:
    """The ``/v1`` routes, closed over one GatewayCore (built per replica)."""
    router = APIRouter(prefix="/v1")
    max_body = core.settings.gateway.max_body_bytes
    _add_model_routes(router, core)
    _add_chat_route(router, core, max_body)
    _add_completions_route(router, core, max_body)
    return router

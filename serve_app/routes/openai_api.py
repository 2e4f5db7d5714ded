"""OpenAI-compatible routes under ``/v1``: models, chat completions, completions.

Thin: parse -> translate -> one handle call -> encode. Stream chunks are encoded with
orjson from small dicts (no pydantic on the way out) and flushed as soon as they exist.
"""

from __future__ import annotations

import time
from typing import Any, AsyncIterator, Optional

import orjson
from fastapi import APIRouter, Request

from serve_app.gateway.adapters import adapter_card, replica_header
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.deadline import apply_start_within
from serve_app.errors import TroupeError, as_troupe_error
from serve_app.http.plumbing import (
    JSONResponse,
    error_event_data,
    parse_body,
    read_json,
    request_id_of,
)
from serve_app.gateway.metering import RequestInfo
from serve_app.protocol.internal import GenerationRequest, TextChunk
from serve_app.protocol.openai import (
    CHAT_EXAMPLE,
    COMPLETION_EXAMPLE,
    ChatCompletionRequest,
    CompletionRequest,
    unknown_fields,
)
from serve_app.http.sse import SSEResponse

__all__ = ["build_openai_router", "peek_stream"]


async def peek_stream(
    chunks: AsyncIterator[TextChunk],
) -> tuple[TextChunk, AsyncIterator[TextChunk]]:
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
    **text: Any,
) -> GenerationRequest:
    """The checks every OpenAI text route makes, then the internal request."""
    core.note_unknown_fields(route, unknown_fields(body))
    model = core.resolve(body.model)
    core.check_n(body.n)
    request = core.build_request(
        request_id,
        max_tokens=body.output_limit(),
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        stop=body.stop_tuple(),
        **text,
    )
    apply_start_within(model, request, body.start_within, body.service_tier)
    return request


def build_openai_router(core: GatewayCore) -> APIRouter:
    """The ``/v1`` routes, closed over one GatewayCore (built per replica)."""
    router = APIRouter(prefix="/v1")
    created = int(core.started_at)
    max_body = core.settings.gateway.max_body_bytes

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

    @router.post("/chat/completions")
    async def chat_completions(request: Request):
        body = parse_body(
            ChatCompletionRequest, await read_json(request, max_body, CHAT_EXAMPLE), CHAT_EXAMPLE
        )
        request_id = request_id_of(request)
        gen = _admit(core, "/v1/chat/completions", body, request_id, messages=body.messages)
        completion_id = "chatcmpl-" + request_id.removeprefix("req_").replace("-", "")
        now = int(time.time())
        info = RequestInfo("/v1/chat/completions", stream=bool(body.stream))
        if body.stream:
            first, rest = await peek_stream(core.stream(body.model, gen, info))
            return SSEResponse(_chat_events(completion_id, now, body, first, rest, request_id),
                               keepalive_s=core.settings.gateway.sse_keepalive_s)
        result = await core.complete(body.model, gen, info)
        return JSONResponse(
            {
                "id": completion_id,
                "object": "chat.completion",
                "created": now,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "logprobs": None,
                        "finish_reason": result.finish_reason,
                    }
                ],
                "usage": result.usage(),
            },
            headers=replica_header(result),
        )

    @router.post("/completions")
    async def completions(request: Request):
        body = parse_body(
            CompletionRequest,
            await read_json(request, max_body, COMPLETION_EXAMPLE),
            COMPLETION_EXAMPLE,
        )
        request_id = request_id_of(request)
        gen = _admit(core, "/v1/completions", body, request_id, prompt=body.prompt)
        completion_id = "cmpl-" + request_id.removeprefix("req_").replace("-", "")
        now = int(time.time())
        echo = body.prompt if body.echo else ""
        info = RequestInfo("/v1/completions", stream=bool(body.stream))
        if body.stream:
            first, rest = await peek_stream(core.stream(body.model, gen, info))
            return SSEResponse(_completion_events(completion_id, now, body, first, rest, request_id, echo),
                               keepalive_s=core.settings.gateway.sse_keepalive_s)
        result = await core.complete(body.model, gen, info)
        return JSONResponse(
            {
                "id": completion_id,
                "object": "text_completion",
                "created": now,
                "model": body.model,
                "choices": [
                    {
                        "index": 0,
                        "text": echo + result.text,
                        "logprobs": None,
                        "finish_reason": result.finish_reason,
                    }
                ],
                "usage": result.usage(),
            },
            headers=replica_header(result),
        )

    return router


async def _chat_events(
    completion_id: str,
    created: int,
    body: ChatCompletionRequest,
    first: TextChunk,
    rest: AsyncIterator[TextChunk],
    request_id: str,
) -> AsyncIterator[Any]:
    """OpenAI chat.completion.chunk events, an optional usage chunk, then [DONE]."""
    # Every chunk shares this prefix; only the choice differs (cheap, no dict per field).
    head = (
        '{"id":"%s","object":"chat.completion.chunk","created":%d,"model":%s,'
        % (completion_id, created, orjson.dumps(body.model).decode())
    )
    include_usage = body.include_usage()
    usage_tail = ',"usage":null}' if include_usage else "}"

    def choice(delta: str, finish: Optional[str]) -> str:
        return '%s"choices":[{"index":0,"delta":%s,"logprobs":null,"finish_reason":%s}]%s' % (
            head, delta, orjson.dumps(finish).decode(), usage_tail,
        )

    chunk = first
    try:
        yield choice('{"role":"assistant","content":""}', None)
        while True:
            # "cancelled" is Troupe's own reason (OpenAI has none); after a cancel over
            # HTTP nobody is left reading, so in practice clients never see it here.
            finish = chunk.finish_reason
            if chunk.text:
                # The last text rides with the finish reason (one message fewer per stream).
                yield choice('{"content":%s}' % orjson.dumps(chunk.text).decode(), finish)
            elif finish is not None:
                yield choice("{}", finish)
            if finish is not None:
                if include_usage:
                    yield '%s"choices":[],"usage":%s}' % (head, orjson.dumps(chunk.usage()).decode())
                break
            chunk = await rest.__anext__()
    except StopAsyncIteration:
        pass
    except TroupeError as exc:
        yield error_event_data(as_troupe_error(exc), request_id, openai=True)
    finally:
        await rest.aclose()
    yield "[DONE]"


async def _completion_events(
    completion_id: str,
    created: int,
    body: CompletionRequest,
    first: TextChunk,
    rest: AsyncIterator[TextChunk],
    request_id: str,
    echo: str,
) -> AsyncIterator[Any]:
    """OpenAI text_completion events, an optional usage chunk, then [DONE]."""
    head = '{"id":"%s","object":"text_completion","created":%d,"model":%s,' % (
        completion_id, created, orjson.dumps(body.model).decode(),
    )
    include_usage = body.include_usage()
    usage_tail = ',"usage":null}' if include_usage else "}"

    def choice(text: str, finish: Optional[str]) -> str:
        return '%s"choices":[{"index":0,"text":%s,"logprobs":null,"finish_reason":%s}]%s' % (
            head, orjson.dumps(text).decode(), orjson.dumps(finish).decode(), usage_tail,
        )

    chunk = first
    try:
        if echo:
            yield choice(echo, None)
        while True:
            if chunk.finish_reason is not None:
                yield choice(chunk.text, chunk.finish_reason)
                if include_usage:
                    yield '%s"choices":[],"usage":%s}' % (head, orjson.dumps(chunk.usage()).decode())
                break
            if chunk.text:
                yield choice(chunk.text, None)
            chunk = await rest.__anext__()
    except StopAsyncIteration:
        pass
    except TroupeError as exc:
        yield error_event_data(as_troupe_error(exc), request_id, openai=True)
    finally:
        await rest.aclose()
    yield "[DONE]"


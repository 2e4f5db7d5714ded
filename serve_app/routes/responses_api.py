"""``POST /v1/responses``: OpenAI's Responses API over the gateway's text models.

Thin: parse -> translate to a ``GenerationRequest`` -> ``GatewayCore.complete``/``stream``
(so usage, cost, latency and traces are recorded under the route ``/v1/responses``) ->
encode with :mod:`serve_app.protocol.responses`.
"""

from __future__ import annotations

import time
from typing import Any, AsyncGenerator

from fastapi import APIRouter, Request

from serve_app.errors import InvalidRequest, TroupeError, as_troupe_error
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.deadline import apply_start_within
from serve_app.gateway.images import admit_images
from serve_app.gateway.metering import RequestInfo
from serve_app.http.plumbing import JSONResponse, parse_body, read_json, request_id_of
from serve_app.http.sse import SSEResponse
from serve_app.protocol.field_policy import check_fields
from serve_app.protocol.internal import (
    GenerationRequest,
    TextChunk,
    ToolCallDelta,
    merge_tool_call_deltas,
)
from serve_app.protocol.openai import unknown_fields
from serve_app.protocol.responses import (
    RESPONSES_EXAMPLE,
    ResponsesRequest,
    ResponseStreamEncoder,
    logprobs_out,
    response_id,
    response_object,
    status_of,
)
from serve_app.protocol.responses_tools import internal_messages, tool_choice_of, tool_specs
from serve_app.routes.openai_api import peek_stream
from serve_app.routes.text_common import apply_tools, named, next_chunk
from serve_app.tracing import current_span, record_error

__all__ = ["build_responses_router", "ROUTE"]

ROUTE = "/v1/responses"
_CANCELLED = (
    "The model stopped this response before it finished (the request was cancelled on "
    "the server, e.g. the model was unloaded). Retry the request."
)


def build_responses_router(core: GatewayCore) -> APIRouter:
    """The ``/v1/responses`` route, closed over one GatewayCore (built per replica)."""
    router = APIRouter(prefix="/v1")
    max_body = core.settings.gateway.max_body_bytes

    @router.post("/responses")
    async def create_response(request: Request):
        body = parse_body(
            ResponsesRequest,
            await read_json(request, max_body, RESPONSES_EXAMPLE),
            RESPONSES_EXAMPLE,
        )
        request_id = request_id_of(request)
        gen = await _responses_request(core, body, request_id)
        resp_id = response_id(request_id)
        created_at = int(time.time())
        info = RequestInfo(ROUTE, stream=bool(body.stream))
        if body.stream:
            first, rest = await peek_stream(core.stream(body.model, gen, info))
            encoder = ResponseStreamEncoder(resp_id, created_at, body)
            return SSEResponse(_response_events(encoder, first, rest),
                               keepalive_s=core.settings.gateway.sse_keepalive_s)
        result = await core.complete(body.model, gen, info)
        status = status_of(result.finish_reason or "cancelled")
        error = {"code": "cancelled", "message": _CANCELLED} if status == "failed" else None
        return JSONResponse(
            response_object(
                resp_id, created_at, body, status, result.text,
                (result.prompt_tokens, result.completion_tokens, result.cached_tokens), error,
                result.tool_calls, logprobs_out(result.logprobs, body.logprobs_k()),
            )
        )

    return router


async def _responses_request(
    core: GatewayCore, body: ResponsesRequest, request_id: str
) -> GenerationRequest:
    """A Responses body in the internal vocabulary (the one place that translates)."""
    core.note_unknown_fields(ROUTE, check_fields(ROUTE, unknown_fields(body), body.model_extra or {}))
    model = core.resolve(body.model)
    gen = core.build_request(
        request_id,
        max_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
    )
    gen.messages = internal_messages(body.instructions, body.input)
    gen.session_key = body.prompt_cache_key
    apply_tools(gen, lambda: tool_specs(body.tools), tool_choice_of(body.tool_choice),
                body.parallel_tool_calls is not False)
    fmt = body.text.format if body.text is not None else None
    try:
        gen.response_format = None if fmt is None else fmt.internal()
    except ValueError as exc:
        raise InvalidRequest(f"Invalid text.format: {exc}", param="text.format") from None
    gen.sampling.logprobs = body.logprobs_k()
    apply_start_within(model, gen, body.start_within, body.service_tier)
    await admit_images(core, model, gen, param="input")
    return gen


async def _response_events(
    encoder: ResponseStreamEncoder, first: TextChunk, rest: AsyncGenerator[TextChunk, None]
) -> AsyncGenerator[Any, None]:
    """The Responses event sequence; a failure after the start ends it with ``error`` +
    ``response.failed`` (never a hang, never a broken connection)."""
    parts: list[str] = []
    starts: dict[int, ToolCallDelta] = {}  # each call's first delta (id and name)
    deltas: list[ToolCallDelta] = []
    prompt_tokens = first.prompt_tokens
    output_tokens = 0
    chunk = first
    try:
        for event in encoder.start():
            yield named(event)
        while True:
            if chunk.text and encoder.message_open:
                parts.append(chunk.text)
                yield named(encoder.delta(chunk.text, chunk.logprobs))
            for delta in chunk.tool_calls or ():
                deltas.append(delta)
                if delta.id is not None:
                    starts[delta.index] = delta
                    for event in encoder.call_added("".join(parts), delta):
                        yield named(event)
                if delta.arguments and delta.index in starts:
                    yield named(encoder.call_delta(starts[delta.index], delta.arguments))
            output_tokens += chunk.num_tokens
            finish = chunk.finish_reason
            if finish is not None:
                text = "".join(parts)
                if finish == "cancelled":
                    events = encoder.failed(
                        "cancelled", _CANCELLED, text, chunk.prompt_tokens, chunk.completion_tokens
                    )
                else:
                    events = encoder.finish(
                        text, finish, chunk.prompt_tokens, chunk.completion_tokens,
                        _whole(deltas), cached_tokens=chunk.cached_tokens,
                    )
                for event in events:
                    yield named(event)
                return
            chunk = await next_chunk(rest)
    except TroupeError as exc:
        err = as_troupe_error(exc)
        record_error(current_span(), err)
        for event in encoder.failed(
            err.code.lower(), err.message, "".join(parts), prompt_tokens, output_tokens
        ):
            yield named(event)
    finally:
        await rest.aclose()


def _whole(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """The streamed fragments as one whole delta per call."""
    return [ToolCallDelta(i, c.id, c.name, c.arguments)
            for i, c in enumerate(merge_tool_call_deltas(deltas))]

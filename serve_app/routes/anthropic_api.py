"""``POST /v1/messages``: Anthropic's Messages API over the gateway's text models.

Thin: parse -> translate to a ``GenerationRequest`` -> ``GatewayCore.complete``/``stream``
(so usage, cost, latency and traces are recorded under the route ``/v1/messages``) ->
encode with :mod:`serve_app.protocol.anthropic`. Errors on this path, whole responses
and mid-stream ``error`` events alike, use Anthropic's envelope (see
:func:`serve_app.http.plumbing.error_response`).

Headers: ``anthropic-version`` and ``anthropic-beta`` are accepted and not checked (one
behaviour for every version). ``x-api-key`` is how Anthropic clients send their key.
NOTE for the auth layer: treat ``x-api-key: KEY`` exactly like ``Authorization: Bearer KEY``
on this route (the official client sends only ``x-api-key``); until that layer exists the
gateway checks no key here, as on every other route.
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, Optional

from fastapi import APIRouter, Request

from serve_app.errors import (
    InferenceFailed,
    InvalidRequest,
    TroupeError,
    anthropic_error_type,
    as_troupe_error,
)
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.deadline import apply_start_within
from serve_app.gateway.images import admit_images
from serve_app.gateway.metering import RequestInfo
from serve_app.http.plumbing import JSONResponse, parse_body, read_json, request_id_of
from serve_app.http.sse import SSEResponse
from serve_app.protocol.anthropic import (
    MESSAGES_EXAMPLE,
    MessagesRequest,
    MessageStreamEncoder,
    message_id,
    message_object,
    stop_reason_of,
)
from serve_app.protocol.anthropic_tools import (
    cache_mark,
    internal_messages,
    tool_choice_of,
    tool_specs,
    tool_use_blocks,
)
from serve_app.protocol.field_policy import check_fields
from serve_app.protocol.internal import GenerationRequest, TextChunk
from serve_app.protocol.openai import unknown_fields
from serve_app.routes.openai_api import peek_stream
from serve_app.routes.text_common import apply_tools, named, next_chunk
from serve_app.tracing import current_span, record_error

__all__ = ["build_anthropic_router", "ROUTE"]

ROUTE = "/v1/messages"
_CANCELLED = (
    "The model stopped this message before it finished (the request was cancelled on "
    "the server, e.g. the model was unloaded). Retry the request."
)


def build_anthropic_router(core: GatewayCore) -> APIRouter:
    """The ``/v1/messages`` route, closed over one GatewayCore (built per replica)."""
    router = APIRouter(prefix="/v1")
    max_body = core.settings.gateway.max_body_bytes

    @router.post("/messages")
    async def create_message(request: Request):
        body = parse_body(
            MessagesRequest,
            await read_json(request, max_body, MESSAGES_EXAMPLE),
            MESSAGES_EXAMPLE,
        )
        request_id = request_id_of(request)
        gen = await _messages_request(core, body, request_id)
        msg_id = message_id(request_id)
        info = RequestInfo(ROUTE, stream=bool(body.stream))
        if body.stream:
            first, rest = await peek_stream(core.stream(body.model, gen, info))
            encoder = MessageStreamEncoder(msg_id, body.model)
            return SSEResponse(_message_events(encoder, first, rest, request_id),
                               keepalive_s=core.settings.gateway.sse_keepalive_s)
        result = await core.complete(body.model, gen, info)
        if result.finish_reason not in ("stop", "length", "tool_calls"):
            error = InferenceFailed(_CANCELLED)
            error.metered = True  # core.complete already counted this request
            raise error
        return JSONResponse(
            message_object(
                msg_id, body.model, result.text,
                stop_reason_of(result.finish_reason, result.stop_sequence), result.stop_sequence,
                result.prompt_tokens, result.completion_tokens, tool_use_blocks(result.tool_calls),
                cached_tokens=result.cached_tokens,
            )
        )

    return router


async def _messages_request(
    core: GatewayCore, body: MessagesRequest, request_id: str
) -> GenerationRequest:
    """A Messages body in the internal vocabulary (the one place that translates)."""
    extras = unknown_fields(body)
    core.note_unknown_fields(ROUTE, check_fields(ROUTE, extras, body.model_extra or {}))
    model = core.resolve(body.model)
    gen = core.build_request(
        request_id,
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_tuple(),
    )
    try:
        gen.messages = internal_messages(body.system_text(), body.messages,
                                         cache_mark(body.system))
    except ValueError as exc:
        raise InvalidRequest(f"Invalid messages: {exc}", param="messages") from None
    choice, parallel = tool_choice_of(body.tool_choice)
    apply_tools(gen, lambda: tool_specs(body.tools), choice, parallel, required_name="any")
    gen.response_format = body.response_format()
    tier = body.service_tier
    if tier in ("auto", "standard_only") and body.start_within is None and (
            model.provider != "anthropic"):
        tier = None  # Anthropic's values (best available / standard): the default elsewhere
    apply_start_within(model, gen, body.start_within, tier)
    await admit_images(core, model, gen)
    return gen


async def _message_events(
    encoder: MessageStreamEncoder,
    first: TextChunk,
    rest: AsyncGenerator[TextChunk, None],
    request_id: str,
) -> AsyncGenerator[Any, None]:
    """The Messages event sequence; a failure after the start is one ``error`` event.

    Text streams in block 0; each tool call opens its own ``tool_use`` block after it
    (the block before is closed first) and streams its input as ``input_json_delta``.
    """
    try:
        for event in encoder.start(first.prompt_tokens):
            yield named(event)
        chunk = first
        open_block: Optional[int] = 0
        while True:
            if chunk.text and open_block == 0:
                yield named(encoder.delta(chunk.text))
            for delta in chunk.tool_calls or ():
                block = delta.index + 1
                if delta.id is not None:
                    if open_block is not None:
                        yield named(encoder.block_stop(open_block))
                    open_block = block
                    yield named(encoder.tool_start(block, delta.id, delta.name or ""))
                if delta.arguments:
                    yield named(encoder.tool_delta(block, delta.arguments))
            finish = chunk.finish_reason
            if finish is not None:
                if finish not in ("stop", "length", "tool_calls"):
                    raise InferenceFailed(_CANCELLED)
                for event in encoder.finish(
                    stop_reason_of(finish, chunk.stop_sequence), chunk.stop_sequence,
                    chunk.prompt_tokens, chunk.completion_tokens, open_block,
                    cached_tokens=chunk.cached_tokens,
                ):
                    yield named(event)
                return
            chunk = await next_chunk(rest)
    except TroupeError as exc:
        err = as_troupe_error(exc)
        record_error(current_span(), err)
        yield named(MessageStreamEncoder.error(anthropic_error_type(err), err.message, request_id))
    finally:
        await rest.aclose()

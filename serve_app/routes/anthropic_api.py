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

from typing import Any, AsyncGenerator

from fastapi import APIRouter, Request

from serve_app.gateway.core import GatewayCore
from serve_app.errors import InferenceFailed, TroupeError, anthropic_error_type, as_troupe_error
from serve_app.http.plumbing import JSONResponse, parse_body, read_json, request_id_of
from serve_app.gateway.metering import RequestInfo
from serve_app.protocol.anthropic import (
    MESSAGES_EXAMPLE,
    MessagesRequest,
    MessageStreamEncoder,
    message_id,
    message_object,
    stop_reason_of,
)
from serve_app.protocol.internal import TextChunk
from serve_app.protocol.openai import unknown_fields
from serve_app.routes.openai_api import peek_stream
from serve_app.routes.text_common import named, next_chunk, turns_of
from serve_app.http.sse import SSEResponse
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
        core.note_unknown_fields(ROUTE, unknown_fields(body))
        core.resolve(body.model)
        gen = core.build_request(
            request_id,
            messages=turns_of(body.turns()),
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_tuple(),
        )
        msg_id = message_id(request_id)
        info = RequestInfo(ROUTE, stream=bool(body.stream))
        if body.stream:
            first, rest = await peek_stream(core.stream(body.model, gen, info))
            encoder = MessageStreamEncoder(msg_id, body.model)
            return SSEResponse(_message_events(encoder, first, rest, request_id),
                               keepalive_s=core.settings.gateway.sse_keepalive_s)
        result = await core.complete(body.model, gen, info)
        if result.finish_reason not in ("stop", "length"):
            error = InferenceFailed(_CANCELLED)
            error.metered = True  # core.complete already counted this request
            raise error
        return JSONResponse(
            message_object(
                msg_id, body.model, result.text,
                stop_reason_of(result.finish_reason, result.stop_sequence), result.stop_sequence,
                result.prompt_tokens, result.completion_tokens,
            )
        )

    return router


async def _message_events(
    encoder: MessageStreamEncoder,
    first: TextChunk,
    rest: AsyncGenerator[TextChunk, None],
    request_id: str,
) -> AsyncGenerator[Any, None]:
    """The Messages event sequence; a failure after the start is one ``error`` event."""
    try:
        for event in encoder.start(first.prompt_tokens):
            yield named(event)
        chunk = first
        while True:
            if chunk.text:
                yield named(encoder.delta(chunk.text))
            finish = chunk.finish_reason
            if finish is not None:
                if finish not in ("stop", "length"):
                    raise InferenceFailed(_CANCELLED)
                for event in encoder.finish(
                    stop_reason_of(finish, chunk.stop_sequence), chunk.stop_sequence,
                    chunk.prompt_tokens, chunk.completion_tokens,
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

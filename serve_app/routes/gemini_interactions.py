"""``POST /v1beta/interactions``: Gemini's Interactions API shape, text turns only.

Create, unary or streamed (``stream: true``): ``input`` as a string, a list of content
(one user turn) or a list of steps (``user_input`` / ``model_output`` turns with ``text``
or inline ``image`` content), ``system_instruction``, and ``generation_config``
(``temperature``, ``top_p``, ``max_output_tokens``, ``stop_sequences``, ``seed``,
``presence_penalty``, ``frequency_penalty``). The answer is an interaction with one
``model_output`` step and ``usage``; a stream is the named events ``interaction.created``,
``step.start``, ``step.delta`` (``{"type": "text"}``) …, ``step.stop``,
``interaction.completed``. Nothing is stored: ``store`` is accepted and ignored, and
``previous_interaction_id``, ``background``, tools, response formats and agents are a 400
naming the field (function calling and JSON are served on ``generateContent``).
"""

from __future__ import annotations

import time
from typing import Any, AsyncGenerator, Optional

import orjson
from fastapi import APIRouter, Request
from sse_starlette import ServerSentEvent

from serve_app.errors import InvalidRequest, TroupeError, as_troupe_error, gemini_error_body
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.images import admit_images
from serve_app.gateway.metering import RequestInfo
from serve_app.http.plumbing import JSONResponse, read_json, request_id_of
from serve_app.http.sse import SSEResponse
from serve_app.protocol.internal import ChatMessage, ContentPart, ImagePart, TextChunk, TextPart
from serve_app.routes.openai_api import peek_stream
from serve_app.routes.text_common import next_chunk
from serve_app.tracing import current_span, record_error

__all__ = ["build_interactions_router"]

ROUTE = "/v1beta/interactions"
_EXAMPLE = '{"model": "smollm2-135m", "input": "Hello"}'
_CONFIG = {"temperature", "top_p", "max_output_tokens", "stop_sequences", "seed",
           "presence_penalty", "frequency_penalty"}
_IGNORED = {"store", "safety_settings", "labels"}
_KNOWN = {"model", "input", "system_instruction", "generation_config", "stream"} | _IGNORED


def _bad(param: str, why: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid {param}: {why}", param=param)


def _parts(content: Any, where: str) -> tuple[ContentPart, ...]:
    if not isinstance(content, list) or not content:
        raise _bad(where, "content is a non-empty list of text or image items")
    parts: list[ContentPart] = []
    for i, item in enumerate(content):
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text" and isinstance(item.get("text"), str):
            parts.append(TextPart(item["text"]))
        elif kind == "image" and isinstance(item.get("data"), str) and item.get("mime_type"):
            parts.append(ImagePart(f"data:{item['mime_type']};base64,{item['data']}"))
        else:
            raise _bad(f"{where}.{i}", "only text and inline image (data, mime_type) content "
                                       "is served on interactions")
    return tuple(parts)


def _turn(role: str, parts: tuple[ContentPart, ...]) -> ChatMessage:
    text = "\n".join(p.text for p in parts if isinstance(p, TextPart))
    has_image = any(isinstance(p, ImagePart) for p in parts)
    return ChatMessage(role, text, parts if has_image else ())


def _messages(body: dict[str, Any]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    system = body.get("system_instruction")
    if system is not None:
        if not isinstance(system, str):
            raise _bad("system_instruction", "a string")
        out.append(ChatMessage("system", system))
    data = body.get("input")
    if isinstance(data, str):
        return [*out, ChatMessage("user", data)]
    if not isinstance(data, list) or not data:
        raise _bad("input", "a string, a list of content or a list of steps")
    if all(isinstance(s, dict) and s.get("type") in ("user_input", "model_output") for s in data):
        for i, step in enumerate(data):
            role = "user" if step["type"] == "user_input" else "assistant"
            out.append(_turn(role, _parts(step.get("content"), f"input.{i}.content")))
        return out
    return [*out, _turn("user", _parts(data, "input"))]


def _config(core: GatewayCore, request_id: str, body: dict[str, Any]) -> Any:
    config = body.get("generation_config") or {}
    if not isinstance(config, dict):
        raise _bad("generation_config", "an object")
    extra = sorted(set(config) - _CONFIG)
    if extra:
        raise _bad(f"generation_config.{extra[0]}", "not served on interactions here")
    stop = config.get("stop_sequences") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _bad("generation_config.stop_sequences", "a list of non-empty strings")
    gen = core.build_request(request_id, max_tokens=config.get("max_output_tokens"),
                             temperature=config.get("temperature"), top_p=config.get("top_p"),
                             seed=config.get("seed"), stop=tuple(stop))
    gen.sampling.presence_penalty = float(config.get("presence_penalty") or 0.0)
    gen.sampling.frequency_penalty = float(config.get("frequency_penalty") or 0.0)
    return gen


def _interaction(iid: str, model: str, status: str, started: float,
                 result: Optional[TextChunk] = None) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out: dict[str, Any] = {"id": iid, "object": "interaction", "model": model, "status": status,
                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                           "updated": now, "role": "model"}
    if result is not None:
        out["steps"] = [{"type": "model_output", "content": [{"type": "text", "text": result.text}]}]
        out["usage"] = {"total_input_tokens": result.prompt_tokens,
                        "total_output_tokens": result.completion_tokens,
                        "total_tokens": result.prompt_tokens + result.completion_tokens}
    return out


def _status(finish: Optional[str]) -> str:
    return {"length": "incomplete", "cancelled": "cancelled"}.get(finish or "", "completed")


def build_interactions_router(core: GatewayCore) -> APIRouter:
    """``POST /v1beta/interactions``, closed over one GatewayCore."""
    router = APIRouter(prefix="/v1beta")
    max_body = core.settings.gateway.max_body_bytes

    @router.post("/interactions")
    async def create(request: Request):
        body = await read_json(request, max_body, _EXAMPLE)
        if not isinstance(body, dict):
            raise InvalidRequest(f"The request body must be a JSON object. Example: {_EXAMPLE}")
        refused = sorted(k for k, v in body.items() if k not in _KNOWN and v not in (None, False))
        if refused:
            raise _bad(refused[0], "not served on interactions here (generateContent serves "
                                   "tools and JSON output)")
        model_id = body.get("model")
        if not isinstance(model_id, str) or not model_id:
            raise _bad("model", "a model id is required")
        model = core.resolve(model_id.removeprefix("models/"))
        request_id = request_id_of(request)
        gen = _config(core, request_id, body)
        gen.messages = _messages(body)
        await admit_images(core, model, gen, param="input")
        iid = request_id.removeprefix("req_")
        started = time.time()
        if body.get("stream"):
            info = RequestInfo(ROUTE, stream=True)
            first, rest = await peek_stream(core.stream(model.id, gen, info))
            return SSEResponse(_events(iid, model_id, started, first, rest, request_id),
                               keepalive_s=core.settings.gateway.sse_keepalive_s)
        result = await core.complete(model.id, gen, RequestInfo(ROUTE))
        return JSONResponse(_interaction(iid, model_id, _status(result.finish_reason), started, result))

    return router


def _event(payload: dict[str, Any]) -> ServerSentEvent:
    return ServerSentEvent(data=orjson.dumps(payload).decode(), event=payload["event_type"], sep="\n")


async def _events(iid: str, model: str, started: float, first: TextChunk,
                  rest: AsyncGenerator[TextChunk, None], request_id: str
                  ) -> AsyncGenerator[Any, None]:
    """The named events of one streamed interaction; a late failure is one ``error`` event."""
    try:
        yield _event({"event_type": "interaction.created",
                      "interaction": _interaction(iid, model, "in_progress", started)})
        yield _event({"event_type": "step.start", "index": 0,
                      "step": {"type": "model_output", "content": []}})
        chunk, text = first, []
        while True:
            if chunk.text:
                text.append(chunk.text)
                yield _event({"event_type": "step.delta", "index": 0,
                              "delta": {"type": "text", "text": chunk.text}})
            if chunk.finish_reason is not None:
                break
            chunk = await next_chunk(rest)
        yield _event({"event_type": "step.stop", "index": 0})
        whole = TextChunk("".join(text), chunk.completion_tokens, chunk.finish_reason,
                          chunk.prompt_tokens, chunk.completion_tokens)
        yield _event({"event_type": "interaction.completed", "interaction": _interaction(
            iid, model, _status(chunk.finish_reason), started, whole)})
    except TroupeError as exc:
        err = as_troupe_error(exc)
        record_error(current_span(), err)
        yield _event({"event_type": "error", **gemini_error_body(err, request_id)})
    finally:
        await rest.aclose()

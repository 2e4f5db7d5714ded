"""Gemini's API shape under ``/v1beta`` (and ``/v1``), for the official ``google-genai`` client.

``POST /v1beta/models/{model}:generateContent`` / ``:streamGenerateContent`` (``alt=sse``)
/ ``:countTokens`` / ``:embedContent`` / ``:batchEmbedContents``, ``GET /v1beta/models`` and
``GET /v1beta/models/{model}``. Thin, like the other shapes: parse -> translate
(:mod:`serve_app.protocol.gemini_translate`) -> ``GatewayCore`` (metered under these
routes) -> encode (:mod:`serve_app.protocol.gemini_out`). Errors, whole and mid-stream,
are Google's envelope (:func:`serve_app.errors.gemini_error_body`).

Newer ``google-genai`` clients default to API version ``v1``, whose paths
(``/v1/models/{model}:generateContent``) share ``/v1`` with the OpenAI routes:
:class:`GeminiPaths` maps ``/v1/models/...:method`` (and ``GET /v1/models`` from a Google
client, known by its ``x-goog-api-client`` or ``x-goog-api-key`` header) onto ``/v1beta``.

``countTokens`` runs the prompt through the model for one output token (the gateway has
no tokenizer of its own), so the count is exactly what the engine sees; it is metered.
"""

from __future__ import annotations

from typing import Any, AsyncGenerator

import numpy as np
import orjson
from fastapi import APIRouter, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from serve_app.errors import (
    InferenceFailed,
    InvalidRequest,
    NotFound,
    TroupeError,
    as_troupe_error,
    gemini_error_body,
)
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.fanout import complete_all, fan_out, stream_all
from serve_app.gateway.metering import RequestInfo
from serve_app.http.plumbing import JSONResponse, parse_body, read_json, request_id_of
from serve_app.http.sse import SSEResponse
from serve_app.protocol.gemini import (
    EMBED_EXAMPLE,
    GENERATE_EXAMPLE,
    BatchEmbedRequest,
    CountTokensRequest,
    EmbedContentRequest,
    GenerateContentRequest,
    camel_keys,
)
from serve_app.protocol.gemini_out import GeminiStream, candidate, response_object, usage_metadata
from serve_app.protocol.modalities import EmbeddingRequest
from serve_app.routes.gemini_request import gemini_top, generate_request
from serve_app.routes.openai_api import peek_stream
from serve_app.settings import ModelConfig
from serve_app.tracing import current_span, record_error

__all__ = ["build_gemini_router", "GeminiPaths", "ROUTE"]

ROUTE = "/v1beta/models/{model}"
_CANCELLED = ("The model stopped this response before it finished (the request was "
              "cancelled on the server, e.g. the model was unloaded). Retry the request.")
_TEXT_METHODS = ["generateContent", "streamGenerateContent", "countTokens"]
_EMBED_METHODS = ["embedContent", "batchEmbedContents"]


class GeminiPaths:
    """Pure ASGI: ``/v1/models/...`` requests of Gemini's shape go to the ``/v1beta`` routes."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            root: str = scope.get("root_path", "")
            path: str = scope.get("path", "")
            local = path[len(root):] if root and path.startswith(root) else path
            if local == "/v1/interactions" or (local.startswith("/v1/models")
                                               and _is_gemini(scope, local)):
                scope = dict(scope)
                scope["path"] = path[: len(path) - len(local)] + "/v1beta" + local[3:]
                scope["raw_path"] = scope["path"].encode()
        await self.app(scope, receive, send)


def _is_gemini(scope: Scope, local: str) -> bool:
    if local.rpartition(":")[2] in _TEXT_METHODS + _EMBED_METHODS:
        return True  # a ``models/{model}:method`` call exists only in Gemini's shape
    return any(name in (b"x-goog-api-client", b"x-goog-api-key")
               for name, _ in scope.get("headers", ()))


def _model_card(model_id: str, model: ModelConfig) -> dict[str, Any]:
    methods = _EMBED_METHODS if model.modality == "embeddings" else _TEXT_METHODS
    context = getattr(model.engine, "context_length", None)
    return {
        "name": f"models/{model_id}", "baseModelId": model_id, "version": "troupe",
        "displayName": model_id, "description": model.description,
        **({"inputTokenLimit": context} if context else {}),
        "outputTokenLimit": model.default_max_tokens,
        "supportedGenerationMethods": methods,
    }


def _split(target: str) -> tuple[str, str]:
    model, sep, method = target.rpartition(":")
    if not sep or not model:
        raise NotFound(f"No Gemini method in {target!r}: call models/{{model}}:generateContent, "
                       ":streamGenerateContent, :countTokens, :embedContent or "
                       ":batchEmbedContents.")
    return model.removeprefix("models/"), method


def build_gemini_router(core: GatewayCore) -> APIRouter:
    """The ``/v1beta`` routes, closed over one GatewayCore (built per replica)."""
    router = APIRouter(prefix="/v1beta")
    max_body = core.settings.gateway.max_body_bytes

    @router.get("/models")
    async def list_models() -> JSONResponse:
        ids = [m for m, c in core.models.items() if c.modality in ("text", "embeddings")]
        return JSONResponse({"models": [_model_card(m, core.models[m]) for m in ids]})

    @router.get("/models/{model_id:path}")
    async def get_model(model_id: str) -> JSONResponse:
        model_id = model_id.removeprefix("models/")
        return JSONResponse(_model_card(model_id, core.resolve(model_id)))  # an adapter: its base's

    @router.post("/models/{target:path}")
    async def call(target: str, request: Request):
        model_id, method = _split(target)
        body = await read_json(request, max_body, GENERATE_EXAMPLE)
        request_id = request_id_of(request)
        if method in ("generateContent", "streamGenerateContent"):
            return await _generate(core, model_id, method, body, request_id)
        if method == "countTokens":
            return await _count_tokens(core, model_id, body, request_id)
        if method in _EMBED_METHODS:
            return await _embed(core, model_id, method, body, request_id)
        raise NotFound(f"Unknown Gemini method {method!r}; this gateway serves "
                       f"{', '.join(_TEXT_METHODS + _EMBED_METHODS)}.")

    return router


async def _generate(core: GatewayCore, model_id: str, method: str, data: Any,
                    request_id: str):
    body = parse_body(GenerateContentRequest, _camel(data), GENERATE_EXAMPLE)
    route = f"{ROUTE}:{method}"
    gen, n = await generate_request(core, model_id, body, request_id, route)
    response_id = request_id.removeprefix("req_")
    top = gemini_top(body)
    stream = method == "streamGenerateContent"
    info = RequestInfo(route, stream=stream)
    requests = fan_out(gen, n)
    if stream:
        first, rest = await peek_stream(stream_all(core, model_id, requests, info))
        encoder = GeminiStream(model_id, response_id, top)
        return SSEResponse(_events(encoder, first, rest, n, request_id),
                           keepalive_s=core.settings.gateway.sse_keepalive_s)
    results = await complete_all(core, model_id, requests, info)
    if any(r.finish_reason not in ("stop", "length", "tool_calls") for r in results):
        error = InferenceFailed(_CANCELLED)
        error.metered = True
        raise error
    candidates = [candidate(i, r.text, r.tool_calls, r.finish_reason, r.logprobs, top)
                  for i, r in enumerate(results)]
    usage = usage_metadata(results[0].prompt_tokens, sum(r.completion_tokens for r in results),
                           results[0].cached_tokens)
    return JSONResponse(response_object(candidates, usage, model_id, response_id))


async def _events(encoder: GeminiStream, first: tuple[int, Any],
                  rest: AsyncGenerator[tuple[int, Any], None], n: int, request_id: str,
                  ) -> AsyncGenerator[str, None]:
    """Data-only SSE events; a failure after the start is one event in the error envelope."""
    try:
        item = first
        finished = 0
        while True:
            index, chunk = item
            if chunk.finish_reason is not None and chunk.finish_reason not in (
                    "stop", "length", "tool_calls"):
                raise InferenceFailed(_CANCELLED)
            event = encoder.event(index, chunk)
            if event is not None:
                yield event
            finished += chunk.finish_reason is not None
            if finished == n:
                return
            try:
                item = await rest.__anext__()
            except StopAsyncIteration:
                raise InferenceFailed("The model's stream ended without a finish reason. "
                                      "This is a server bug; retry the request.") from None
    except TroupeError as exc:
        err = as_troupe_error(exc)
        record_error(current_span(), err)
        yield orjson.dumps(gemini_error_body(err, request_id)).decode()
    finally:
        await rest.aclose()


def _camel(data: Any) -> Any:
    return camel_keys(data) if isinstance(data, dict) else data


async def _count_tokens(core: GatewayCore, model_id: str, data: Any, request_id: str):
    body = parse_body(CountTokensRequest, _camel(data), GENERATE_EXAMPLE)
    inner = body.generate_content_request
    if (inner is None) == (body.contents is None):
        raise InvalidRequest("Send either 'contents' or 'generateContentRequest'.",
                             param="contents")
    if inner is None:
        inner = GenerateContentRequest(contents=body.contents or [])
    route = f"{ROUTE}:countTokens"
    gen, _n = await generate_request(core, model_id, inner, request_id, route)
    gen.sampling.max_tokens = 1
    gen.sampling.logprobs = None
    gen.tool_choice, gen.response_format = "auto", None
    result = await core.complete(model_id, gen, RequestInfo(route))
    return JSONResponse({"totalTokens": result.prompt_tokens,
                         "promptTokensDetails": [{"modality": "TEXT",
                                                  "tokenCount": result.prompt_tokens}]})


def _embed_text(entry: EmbedContentRequest, where: str) -> str:
    texts = []
    for k, part in enumerate(entry.content.parts):
        if part.text is None or any(v is not None for f, v in part if f not in ("text",)):
            raise InvalidRequest(f"{where}content.parts.{k}: embedding models here read text "
                                 "parts only.", param=f"{where}content.parts.{k}")
        texts.append(part.text)
    if not texts:
        raise InvalidRequest(f"{where}content needs at least one text part.",
                             param=f"{where}content.parts")
    return "\n".join(texts)


async def _embed(core: GatewayCore, model_id: str, method: str, data: Any, request_id: str):
    route = f"{ROUTE}:{method}"
    if method == "embedContent":
        entries = [parse_body(EmbedContentRequest, _camel(data), EMBED_EXAMPLE)]
        wheres = [""]
    else:
        entries = parse_body(BatchEmbedRequest, _camel(data), EMBED_EXAMPLE).requests
        wheres = [f"requests.{i}." for i in range(len(entries))]
    for entry, where in zip(entries, wheres):
        if entry.model is not None and entry.model.removeprefix("models/") != model_id:
            raise InvalidRequest(f"{where}model {entry.model!r} differs from the model in the "
                                 f"URL ({model_id!r}).", param=f"{where}model")
    dims = {e.output_dimensionality for e in entries}
    if len(dims) > 1:
        raise InvalidRequest("Every request of a batch needs the same outputDimensionality.",
                             param="requests.outputDimensionality")
    texts: list[str | list[int]] = [_embed_text(e, w) for e, w in zip(entries, wheres)]
    core.admit(model_id, "embeddings", f"POST {route}")
    result = await core.embed(model_id, EmbeddingRequest(request_id, texts, dims.pop()),
                              RequestInfo(route))
    vectors = [{"values": np.frombuffer(raw, dtype="<f4").tolist()} for raw in result.vectors]
    if method == "embedContent":
        return JSONResponse({"embedding": vectors[0]})
    return JSONResponse({"embeddings": vectors})

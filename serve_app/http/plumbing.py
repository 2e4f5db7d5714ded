"""HTTP plumbing shared by every route: request ids, body parsing, error envelopes.

Errors reach the wire only through :func:`install_error_handlers` (whole responses) and
:func:`error_event_data` (errors after a stream started); routes just raise.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Optional, TypeVar

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serve_app.errors import (
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    RequestTooLarge,
    TroupeError,
    anthropic_error_body,
    as_troupe_error,
    gemini_error_body,
    native_error_body,
    openai_error_body,
)
from serve_app.tracing import current_span, record_error

__all__ = [
    "RequestIdMiddleware",
    "JSONResponse",
    "request_id_of",
    "request_id_of_scope",
    "read_json",
    "parse_body",
    "is_openai_path",
    "is_anthropic_path",
    "is_gemini_path",
    "route_label",
    "error_response",
    "error_event_data",
    "install_error_handlers",
]

logger = logging.getLogger("troupe.http")
M = TypeVar("M", bound=BaseModel)


def new_request_id() -> str:
    return "req_" + os.urandom(12).hex()


class RequestIdMiddleware:
    """Pure ASGI middleware: every request has an id and every response carries it.

    Under Serve, the proxy already assigned the id (the ``x-request-id`` request header,
    also used in Serve's own logs) and adds the response header itself, so we adopt it.
    Without a proxy (tests, plain uvicorn) we generate one and add the header. A
    client's ``X-Client-Request-Id`` is echoed back alongside, never used as ours.
    Pure ASGI rather than BaseHTTPMiddleware, which would buffer streams and break
    cancellation.
    """

    def __init__(self, app: ASGIApp, trust_upstream_id: bool = False) -> None:
        self.app = app
        self.trust_upstream_id = trust_upstream_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        upstream_id: Optional[bytes] = None
        client_id: Optional[bytes] = None
        for name, value in scope.get("headers", ()):
            if name == b"x-request-id" and self.trust_upstream_id:
                upstream_id = value[:128]
            elif name == b"x-client-request-id":
                client_id = value[:128]
        request_id = upstream_id.decode("latin-1") if upstream_id else new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id
        extra = [] if upstream_id else [(b"x-request-id", request_id.encode())]
        if client_id is not None:
            extra.append((b"x-client-request-id", client_id))
        if not extra:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", ())) + extra
            await send(message)

        await self.app(scope, receive, send_with_id)


class JSONResponse(Response):
    """orjson-encoded JSON (fast, and rejects NaN on the way out)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


def request_id_of_scope(scope: Scope) -> str:
    return scope.get("state", {}).get("request_id") or new_request_id()


def request_id_of(request: Request) -> str:
    return request_id_of_scope(request.scope)


async def read_json(request: Request, max_bytes: int, example: str) -> Any:
    """Read and decode a JSON body, with a size cap and clear 4xx errors."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise RequestTooLarge(
            f"The request body is {length} bytes; this gateway accepts at most {max_bytes}.",
            details={"max_bytes": max_bytes},
        )
    body = await request.body()
    if len(body) > max_bytes:
        raise RequestTooLarge(
            f"The request body is {len(body)} bytes; this gateway accepts at most {max_bytes}.",
            details={"max_bytes": max_bytes},
        )
    if not body.strip():
        raise InvalidRequest(
            f"The request body is empty. Send a JSON object, for example: {example}"
        )
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(
            f"The request body is not valid JSON ({exc}). NaN and Infinity are not JSON. "
            f"Send a JSON object, for example: {example}"
        ) from None


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _union_tag(part: Any) -> bool:
    """Is this error-location part pydantic's name for a union member (``str``,
    ``list[int]``, ``NamedChoiceIn``) rather than a field name or index?"""
    return isinstance(part, str) and (
        "[" in part or part in _TYPE_TAGS or part[:1].isupper())


def parse_body(model: type[M], data: Any, example: str) -> M:
    """Validate decoded JSON into ``model``; the first problem becomes a 400 naming its field."""
    if not isinstance(data, dict):
        raise InvalidRequest(
            f"The request body must be a JSON object, not {type(data).__name__}. "
            f"Example: {example}"
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        first = errors[0]
        param = ".".join(str(p) for p in first["loc"] if not _union_tag(p)) or None
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]
        )
        raise InvalidRequest(
            f"Invalid request: {problems}. Example of a valid body: {example}",
            param=param,
            details={"errors": [
                {"loc": [str(p) for p in e["loc"]], "msg": e["msg"]} for e in errors[:20]
            ]},
        ) from None


def route_label(scope: Scope) -> str:
    """The matched route's template (bounded cardinality), never the raw path."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"


def is_openai_path(scope: Scope) -> bool:
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.startswith("/v1/") or path == "/v1"


def is_anthropic_path(scope: Scope) -> bool:
    """``/v1/messages`` (Anthropic's shape) answers errors in Anthropic's envelope."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def is_gemini_path(scope: Scope) -> bool:
    """``/v1beta/...`` (Gemini's shape) answers errors in Google's envelope."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.startswith("/v1beta/") or path == "/v1beta"


def error_response(
    err: TroupeError, scope: Scope, extra_headers: Optional[dict[str, str]] = None
) -> JSONResponse:
    record_error(current_span(), err)  # the request's span carries the Troupe code
    request_id = scope.get("state", {}).get("request_id")
    if is_anthropic_path(scope):
        body = anthropic_error_body(err, request_id)
    elif is_gemini_path(scope):
        body = gemini_error_body(err, request_id)
    elif is_openai_path(scope):
        body = openai_error_body(err, request_id)
    else:
        body = native_error_body(err, request_id)
    return JSONResponse(
        body, status_code=err.status, headers={**err.headers(), **(extra_headers or {})}
    )


def error_event_data(err: TroupeError, request_id: Optional[str], openai: bool) -> str:
    """The JSON of an SSE error event sent after a stream started."""
    record_error(current_span(), err)
    body = openai_error_body(err, request_id) if openai else native_error_body(err, request_id)
    return orjson.dumps(body).decode()


def install_error_handlers(
    app: FastAPI, on_rejected: Optional[Callable[[str, TroupeError, str], None]] = None
) -> None:
    """Map every failure to the envelope of the route family, in one place.

    ``on_rejected(route, error, request_id)`` is told of errors that no model call has
    accounted for yet (bad input, unknown model), so metrics count every request once.
    """

    async def on_troupe_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, TroupeError)  # registered for it (Starlette types handlers by Exception)
        if exc.status >= 500:
            logger.error("request %s failed: %s", request_id_of(request), exc.message)
        if on_rejected is not None and not exc.metered:
            on_rejected(route_label(request.scope), as_troupe_error(exc), request_id_of(request))
        return error_response(exc, request.scope)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)  # registered for it (Starlette types handlers by Exception)
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        return error_response(InvalidRequest(f"Invalid request: {first['msg']}", param=param),
                              request.scope)

    async def on_http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)  # registered for it (Starlette types handlers by Exception)
        if exc.status_code == 404:
            err: TroupeError = NotFound(
                f"No route {request.method} {request.url.path}. The OpenAI routes live under "
                "/v1 (e.g. POST /v1/chat/completions); native ones are /health, /models, "
                "/inference, /inference/stream and /ws."
            )
        elif exc.status_code == 405:
            allow = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow")
            err = MethodNotAllowed(
                f"{request.method} is not allowed on {request.url.path}"
                + (f"; use {allow}." if allow else "."),
                details={"allow": allow},
            )
            return error_response(err, request.scope, {"Allow": allow} if allow else None)
        elif 400 <= exc.status_code < 500:
            err = InvalidRequest(str(exc.detail))
            err.status = exc.status_code
        else:
            err = InternalError(str(exc.detail))
        return error_response(err, request.scope)

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        logger.exception("unexpected error on request %s", request_id_of(request))
        return error_response(as_troupe_error(exc), request.scope)

    app.add_exception_handler(TroupeError, on_troupe_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_unexpected)

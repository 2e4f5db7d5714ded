"""The gateway's ASGI tracing middleware: one SERVER span per HTTP request."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from serve_app.tracing import process
from serve_app.tracing.propagation import context_from_headers
from serve_app.tracing.spans import ATTR_REQUEST_ID, end_span

__all__ = ["TracingMiddleware"]

_UNTRACED_PATHS = frozenset(
    {"/", "/health", "/metrics", "/traces", "/favicon.ico", "/docs", "/openapi.json"}
)


def _status_unset(span: Span) -> bool:
    """Whether no one set the span's status yet (only SDK spans can tell; others say yes)."""
    return not isinstance(span, ReadableSpan) or span.status.status_code is StatusCode.UNSET


class TracingMiddleware:
    """Pure ASGI: one SERVER span per HTTP request, a child of the client's ``traceparent``.

    The span is the current span while the app runs (routes, error handlers and the
    streamed body all see it), so ``inject_context()`` in the gateway core needs no
    arguments; it ends when the response (stream included) is finished. WebSocket
    connections get no span of their own: the client's context from the handshake is
    made current, and each WS request opens its own span under it. Place it inside
    ``RequestIdMiddleware`` so the request id is in scope state.
    """

    def __init__(self, app: Any, untraced_paths: Iterable[str] = _UNTRACED_PATHS) -> None:
        self.app = app
        self.untraced_paths = frozenset(untraced_paths)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        tracer = process.tracer
        kind = scope["type"]
        untraced = kind not in ("http", "websocket") or scope["path"] in self.untraced_paths
        if tracer is None or untraced:
            await self.app(scope, receive, send)
            return
        parent = context_from_headers(scope.get("headers", ()))
        if kind == "websocket":
            if parent is None:
                await self.app(scope, receive, send)
                return
            token = otel_context.attach(parent)
            try:
                await self.app(scope, receive, send)
            finally:
                otel_context.detach(token)
            return
        method = scope.get("method", "GET")
        span = tracer.start_span(
            f"{method} {scope['path']}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": method,
                "url.path": scope["path"],
                ATTR_REQUEST_ID: scope.get("state", {}).get("request_id", ""),
            },
        )
        if not span.is_recording():  # sampled out: keep the context, skip the bookkeeping
            token = otel_context.attach(trace.set_span_in_context(span, parent))
            try:
                await self.app(scope, receive, send)
            finally:
                otel_context.detach(token)
            return

        async def send_traced(message: Any) -> None:
            if message["type"] == "http.response.start":
                status = message["status"]
                span.set_attribute("http.response.status_code", status)
                if status >= 500 and _status_unset(span):
                    span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            await send(message)

        token = otel_context.attach(trace.set_span_in_context(span, parent))
        error: Optional[BaseException] = None
        try:
            await self.app(scope, receive, send_traced)
        except BaseException as exc:
            error = exc
            raise
        finally:
            otel_context.detach(token)
            route = scope.get("route")
            route_path = getattr(route, "path", None)  # FastAPI's matched template
            if route_path:
                span.update_name(f"{method} {route_path}")
            end_span(span, error)

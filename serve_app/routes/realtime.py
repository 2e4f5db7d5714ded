"""WebSocket ``/v1/realtime?model=...``: OpenAI's Realtime protocol over Troupe's models.

The socket carries JSON events both ways (serve_app/realtime/session.py handles them).
Auth is the gateway's: an ``Authorization: Bearer`` header (checked by the policy
middleware), or, as OpenAI's browser and SDK clients send it when they cannot set
headers, a WebSocket subprotocol ``openai-insecure-api-key.<key>``. When the client
offers subprotocols the server picks ``realtime``, as OpenAI's does (browsers drop a
connection whose server picks none).
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Optional

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from actors.session import credential_source
from serve_app.errors import AuthenticationFailed, InvalidRequest, TroupeError
from serve_app.http.plumbing import request_id_of_scope
from serve_app.policies.context import PRINCIPAL
from serve_app.protocol.realtime import SessionConfig
from serve_app.realtime.conversation import new_id
from serve_app.realtime.models import ROUTE, CoreModels, RealtimeMetrics
from serve_app.realtime.proxy import proxy_target, relay
from serve_app.realtime.session import RealtimeSession, SessionLimits

__all__ = ["build_realtime_router"]

logger = logging.getLogger("troupe.realtime")

KEY_PROTOCOL = "openai-insecure-api-key."
CLOSE_AUTH = 4401
CLOSE_POLICY = 1008


def _subprotocols(websocket: WebSocket) -> list[str]:
    raw = websocket.headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]


def _rate_limits(headers: list[tuple[bytes, bytes]]) -> list[dict[str, Any]]:
    """The policy layer's X-RateLimit headers as ``rate_limits.updated`` entries."""
    values = {k.decode(): v.decode() for k, v in headers}
    if "x-ratelimit-limit" not in values:
        return []
    return [{"name": "requests", "limit": int(values["x-ratelimit-limit"]),
             "remaining": int(values.get("x-ratelimit-remaining", 0)),
             "reset_seconds": float(values.get("x-ratelimit-reset-after", 0))}]


class RealtimeSocket:
    """One ``/v1/realtime`` connection: handshake, auth, then the event loop."""

    def __init__(self, core: Any, websocket: WebSocket, metrics: RealtimeMetrics) -> None:
        self.core = core
        self.ws = websocket
        self.metrics = metrics
        self.closed = False
        state = websocket.scope.get("state", {})
        self.policy = state.get("policy")
        self.principal = state.get("principal")
        self.auth_pending = bool(state.get("auth_pending"))

    async def send(self, event: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            await self.ws.send_text(orjson.dumps(event).decode())
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.closed = True

    async def send_raw(self, text: str) -> None:
        """A provider's event, relayed as it came (a proxied session)."""
        if self.closed:
            return
        try:
            await self.ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.closed = True

    async def refuse(self, err: TroupeError, code: int) -> None:
        """An ``error`` event, then the socket closes (auth, unknown model)."""
        await self.send({"type": "error", "event_id": new_id("event"), "error": {
            "type": "invalid_request_error" if err.status != 401 else "authentication_error",
            "code": err.code.lower(), "message": err.message, "param": getattr(err, "param", None)}})
        self.closed = True
        try:
            await self.ws.close(code=code)
        except (RuntimeError, OSError):
            pass

    def authenticate(self) -> None:
        """The subprotocol key, when no header carried one (raises AuthenticationFailed)."""
        token = next((p[len(KEY_PROTOCOL):] for p in _subprotocols(self.ws) if p.startswith(KEY_PROTOCOL)), "")
        if not token:
            raise AuthenticationFailed(
                "No API key: connect with 'Authorization: Bearer trp_...' or the subprotocol "
                f"'{KEY_PROTOCOL}trp_...' (as OpenAI's clients send it).")
        self.principal = self.policy.authenticate(token)
        self.auth_pending = False
        PRINCIPAL.set(self.principal)  # this task and the ones it starts run as the caller

    def admitter(self) -> Optional[Callable[[], Awaitable[Any]]]:
        limiter = getattr(self.policy, "limiter", None)
        if limiter is None or self.principal is None:
            return None

        async def admit() -> Any:
            admission = await limiter.admit(self.principal)
            if admission is None:
                return None
            return _rate_limits(admission.headers), lambda tokens: limiter.finish(admission, tokens)

        return admit

    def new_session(self, model: Optional[str]) -> RealtimeSession:
        rt = self.core.settings.realtime
        llm = model or rt.llm or next((m.id for m in self.core.models.values() if m.modality == "text"), "")
        config = SessionConfig(model=llm)
        config.audio.output.voice = rt.voice
        if rt.tts is None and not any(m.modality == "speech" for m in self.core.models.values()):
            config.output_modalities = ["text"]  # nothing here can speak: answer in text
        return RealtimeSession(CoreModels(self.core), config, self.send, request_id_of_scope(self.ws.scope),
                               SessionLimits(rt.max_buffer_s, rt.max_output_tokens), self.metrics,
                               admit=self.admitter())

    async def run(self, model: Optional[str]) -> None:
        offered = _subprotocols(self.ws)
        await self.ws.accept(subprotocol="realtime" if offered else None)
        try:
            if self.auth_pending:
                self.authenticate()
        except TroupeError as err:
            await self.refuse(err, CLOSE_AUTH)
            return
        if model is not None and model in self.core.settings.realtime.proxy:
            await self.proxy(model)
            return
        try:
            session = self.new_session(model)
        except TroupeError as err:
            await self.refuse(err, CLOSE_POLICY)
            return
        await session.start()
        try:
            await self.loop(session)
        finally:
            self.closed = True
            await session.close()

    async def proxy(self, model: str) -> None:
        """Relay the session to the provider's own realtime endpoint (``realtime.proxy``)."""
        try:
            self.core.admit(model, "text", ROUTE)
            engine = self.core.settings.model(model).engine
            target = await proxy_target(engine, credential_source())
            await relay(self.ws.receive, self.send_raw, target)
        except TroupeError as err:
            await self.refuse(err, CLOSE_POLICY)

    async def loop(self, session: RealtimeSession) -> None:
        limit = self.core.settings.realtime.max_event_bytes
        while not self.closed:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            raw = message.get("text")
            if raw is None:
                await session.error(InvalidRequest(
                    "Send client events as JSON text frames, not binary; audio goes base64 in "
                    "input_audio_buffer.append.", param="type"))
                continue
            if len(raw) > limit:
                await session.error(InvalidRequest(
                    f"An event of {len(raw)} bytes exceeds the {limit}-byte limit; send audio in "
                    "smaller input_audio_buffer.append events.", param="audio",
                    details={"realtime_code": "event_too_large"}))
                continue
            try:
                event = orjson.loads(raw)
            except orjson.JSONDecodeError:
                await session.error(InvalidRequest(
                    'Client events must be JSON objects, e.g. {"type": "response.create"}.',
                    param="type", details={"realtime_code": "invalid_json"}))
                continue
            await session.handle(event)


def build_realtime_router(core: Any, metrics_actor: Any = None) -> APIRouter:
    router = APIRouter()
    metrics = RealtimeMetrics(metrics_actor)

    @router.websocket("/v1/realtime")
    async def realtime(websocket: WebSocket, model: Optional[str] = None) -> None:
        try:
            await RealtimeSocket(core, websocket, metrics).run(model)
        except WebSocketDisconnect:
            pass

    return router

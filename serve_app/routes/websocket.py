"""WebSocket ``/ws``: many streamed requests per socket, each ending in one terminal message.

Client -> server: ``auth``, ``inference`` (with ``id``), ``cancel`` (``id``), ``ping``.
Server -> client: ``auth.ok``, ``token``, ``complete`` (usage, finish reason, cost),
``error`` (with ``id`` when the failure belongs to a request), ``pong``.

Every accepted ``inference`` id ends in exactly one ``complete`` or ``error``. ``cancel``
ends it with ``complete`` and ``finish_reason: "cancelled"``; a closed socket cancels all
of them. Cancelling closes the gateway's stream, which cancels the model deployment's
generator, which aborts the engine request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Optional

import orjson
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from serve_app.errors import AuthenticationFailed, InvalidRequest, TroupeError, as_troupe_error
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.metering import RequestInfo
from serve_app.gateway.voice import VoiceSocket, run_voice_end
from serve_app.http.plumbing import request_id_of_scope
from serve_app.policies.context import PRINCIPAL, USAGE, UsageTally
from serve_app.protocol.internal import TextChunk, ToolCallDelta, merge_tool_call_deltas
from serve_app.protocol.native import WS_EXAMPLE, WSCancel, WSInference, logprobs_out, tool_call_out
from serve_app.protocol.openai import unknown_fields
from serve_app.routes.native import native_request
from serve_app.tracing import (
    ATTR_MODEL,
    ATTR_REQUEST_ID,
    SpanKind,
    current_span,
    record_error,
    traced,
)

__all__ = ["build_ws_router", "WebSocketSession"]

logger = logging.getLogger("troupe.ws")

MAX_MESSAGE_BYTES = 1024 * 1024
MAX_IN_FLIGHT = 64
WS_INFO = RequestInfo("/ws", stream=True)


def _error_message(err: TroupeError, request_id: Optional[str], trace_id: str) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "type": "error",
        "error": {"code": err.code, "message": err.message, "details": err.details},
        "request_id": trace_id,
    }
    if request_id is not None:
        msg["id"] = request_id
    if err.retry_after_s is not None:
        msg["error"]["retry_after_s"] = err.retry_after_s
    return msg


class WebSocketSession:
    """One connected socket: reads messages, runs requests as tasks, writes results."""

    def __init__(self, core: GatewayCore, websocket: WebSocket) -> None:
        self.core = core
        self.ws = websocket
        self.socket_id = request_id_of_scope(websocket.scope)
        self.tasks: dict[str, asyncio.Task] = {}
        self.cancel_requested: set[str] = set()
        self.closed = False
        #: voice.start / binary frames / voice.end (serve_app/gateway/voice.py)
        self.voice = VoiceSocket(core, self.send, self.send_bytes, self.socket_id)
        state = websocket.scope.get("state", {})
        #: The policy layer, when auth must come in the first message (no header sent).
        self.policy = state.get("policy")
        self.auth_pending = bool(state.get("auth_pending"))
        self.principal = state.get("principal")

    async def send(self, message: dict[str, Any]) -> None:
        if self.closed:
            return
        try:
            await self.ws.send_text(orjson.dumps(message).decode())
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.closed = True

    async def send_bytes(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            await self.ws.send_bytes(data)
        except (WebSocketDisconnect, RuntimeError, OSError):
            self.closed = True

    async def voice_message(self, kind: str, data: dict[str, Any]) -> None:
        """voice.start opens an utterance; voice.end runs the pipeline as a task."""
        vid = data.get("id") if isinstance(data.get("id"), str) else None
        try:
            if kind == "voice.start":
                self.voice.start(data)
                return
            task = asyncio.create_task(run_voice_end(
                self.voice, data, lambda err, rid: self.send(self.error(err, rid))))
        except TroupeError as err:
            await self.send(self.error(err, vid))
            return
        key = f"voice:{vid}"
        self.tasks[key] = task
        task.add_done_callback(lambda _t: self._forget(key))

    async def run(self) -> None:
        await self.ws.accept()
        try:
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text")
                if raw is None:
                    raw = message.get("bytes") or b""
                    if self.voice.open:  # an utterance's audio frame
                        try:
                            self.voice.add(raw)
                        except TroupeError as err:
                            await self.send(self.error(err))
                        continue
                await self.dispatch(raw)
                if self.closed:
                    break
        except WebSocketDisconnect:
            pass
        finally:
            self.closed = True
            await self.cancel_all()

    async def cancel_all(self) -> None:
        tasks = list(self.tasks.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    def error(self, err: TroupeError, request_id: Optional[str] = None) -> dict[str, Any]:
        record_error(current_span(), err)  # a request's span when called from its task
        return _error_message(err, request_id, self.socket_id)

    async def dispatch(self, raw: str | bytes) -> None:
        if len(raw) > MAX_MESSAGE_BYTES:
            await self.send(self.error(InvalidRequest(
                f"Message of {len(raw)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit."
            )))
            return
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            await self.send(self.error(InvalidRequest(
                f"Messages must be JSON objects. Example: {WS_EXAMPLE}"
            )))
            return
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            await self.send(self.error(InvalidRequest(
                "Every message needs a string 'type': one of auth, inference, cancel, ping. "
                f"Example: {WS_EXAMPLE}"
            ), data.get("id") if isinstance(data, dict) and isinstance(data.get("id"), str) else None))
            return
        kind = data["type"]
        if kind == "ping":
            await self.send({"type": "pong", "ts": data.get("ts", time.time())})
        elif kind == "auth":
            await self.authenticate(data)
        elif self.auth_pending:
            await self.refuse(AuthenticationFailed(
                'Authenticate first: send {"type": "auth", "token": "trp_..."} as the first '
                "message (or connect with an 'Authorization: Bearer' header)."
            ))
        elif kind == "inference":
            await self.start_inference(data)
        elif kind == "cancel":
            await self.cancel(data)
        elif kind in ("voice.start", "voice.end"):
            await self.voice_message(kind, data)
        else:
            await self.send(self.error(InvalidRequest(
                f"Unknown message type {kind!r}. Send one of: auth, inference, cancel, ping."
            ), data.get("id") if isinstance(data.get("id"), str) else None))

    async def authenticate(self, data: dict[str, Any]) -> None:
        """The ``auth`` message: required first when the handshake carried no key."""
        if not self.auth_pending:
            principal = self.principal
            await self.send({"type": "auth.ok", "auth": "disabled" if principal is None
                             or principal.via == "none" else "header",
                             "key_id": None if principal is None else principal.key_id})
            return
        token = data.get("token") or data.get("api_key")
        try:
            if not isinstance(token, str) or not token:
                raise AuthenticationFailed(
                    'The auth message needs a "token": {"type": "auth", "token": "trp_..."}.')
            principal = self.policy.authenticate(token)
        except TroupeError as err:
            await self.refuse(err)
            return
        self.auth_pending = False
        self.principal = principal
        PRINCIPAL.set(principal)  # tasks started from now on run as this caller
        await self.send({"type": "auth.ok", "auth": "key", "key_id": principal.key_id})

    async def refuse(self, err: TroupeError) -> None:
        """Send an auth error and close the socket (4401)."""
        await self.send(self.error(err))
        self.closed = True
        try:
            await self.ws.close(code=4401)
        except (RuntimeError, OSError):
            pass

    async def start_inference(self, data: dict[str, Any]) -> None:
        raw_id = data.get("id")
        request_id = raw_id if isinstance(raw_id, str) and raw_id else None
        try:
            body = WSInference.model_validate(data)
        except ValidationError as exc:
            first = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"]) or "message"
            await self.send(self.error(InvalidRequest(
                f"Invalid inference message: {where}: {first['msg']}. Example: {WS_EXAMPLE}",
                param=where,
            ), request_id))
            return
        if body.id in self.tasks:
            await self.send(self.error(InvalidRequest(
                f"A request with id {body.id!r} is already in flight on this socket; "
                "use a new id for each request."
            ), body.id))
            return
        if len(self.tasks) >= MAX_IN_FLIGHT:
            await self.send(self.error(InvalidRequest(
                f"At most {MAX_IN_FLIGHT} requests may be in flight on one socket."
            ), body.id))
            return
        try:
            self.core.resolve(body.model)
        except TroupeError as err:
            await self.send(self.error(err, body.id))
            return
        self.core.note_unknown_fields("/ws", [n for n in unknown_fields(body) if n != "type"])
        admission = None
        limiter = getattr(self.policy, "limiter", None)
        if limiter is not None and self.principal is not None:
            try:  # each inference message counts against the key's rate limits
                admission = await limiter.admit(self.principal)
            except TroupeError as err:
                await self.send(self.error(err, body.id))
                return
        tally = UsageTally()
        usage_token = USAGE.set(tally)  # the task's copy of the context counts its tokens
        task = asyncio.create_task(self.run_inference(body))
        USAGE.reset(usage_token)
        if admission is not None and limiter is not None:
            task.add_done_callback(lambda _t: limiter.finish(admission, tally.tokens))
        self.tasks[body.id] = task
        task.add_done_callback(lambda _t: self._forget(body.id))

    def _forget(self, rid: str) -> None:
        self.tasks.pop(rid, None)
        self.cancel_requested.discard(rid)  # a cancel that raced with completion

    async def cancel(self, data: dict[str, Any]) -> None:
        try:
            msg = WSCancel.model_validate(data)
        except ValidationError:
            await self.send(self.error(InvalidRequest(
                'A cancel message needs the "id" of a request in flight: '
                '{"type": "cancel", "id": "r1"}'
            )))
            return
        task = self.tasks.get(msg.id)
        if task is None:
            return  # already finished (its terminal message was sent): cancel is idempotent
        self.cancel_requested.add(msg.id)
        task.cancel()

    async def run_inference(self, body: WSInference) -> None:
        """One request's task, traced as its own span under the handshake's traceparent."""
        attributes = {ATTR_REQUEST_ID: f"{self.socket_id}:{body.id}", ATTR_MODEL: body.model}
        with traced("WS /ws inference", kind=SpanKind.SERVER, attributes=attributes):
            await self._run_inference(body)

    async def _run_inference(self, body: WSInference) -> None:
        rid = body.id
        started = time.perf_counter()
        first_token_at: Optional[float] = None
        completion = 0
        prompt_tokens = 0
        index = 0
        try:
            gen = await native_request(self.core, body, f"{self.socket_id}:{rid}")
        except TroupeError as exc:
            await self.send(self.error(as_troupe_error(exc), rid))
            return
        stream = self.core.stream(body.model, gen, WS_INFO)
        finish: Optional[str] = None
        deltas: list[ToolCallDelta] = []
        try:
            async for chunk in stream:
                completion += chunk.num_tokens
                prompt_tokens = chunk.prompt_tokens
                deltas.extend(chunk.tool_calls or ())
                for message in _chunk_messages(rid, chunk, index, body.top_logprobs or 0):
                    first_token_at = first_token_at or time.perf_counter()
                    await self.send(message)
                index += chunk.num_tokens
                if chunk.finish_reason is not None:
                    finish = chunk.finish_reason
                    completion = chunk.completion_tokens
        except asyncio.CancelledError:
            await stream.aclose()
            if rid not in self.cancel_requested:
                raise  # the socket closed: nobody to tell
            self.cancel_requested.discard(rid)
            finish = "cancelled"
        except TroupeError as exc:
            await self.send(self.error(as_troupe_error(exc), rid))
            return
        except Exception as exc:  # never leave an id without a terminal message
            logger.exception("websocket request %s failed", rid)
            await self.send(self.error(as_troupe_error(exc), rid))
            return
        finally:
            await stream.aclose()
        ended = time.perf_counter()
        await self.send(
            {
                **_whole_calls(deltas),
                "type": "complete",
                "id": rid,
                "model": body.model,
                "finish_reason": finish or "cancelled",
                "usage": TextChunk("", 0, None, prompt_tokens, completion).usage(),
                "cost_usd": self.core.prices.quote(body.model, prompt_tokens, completion),
                "latency_ms": {
                    "ttft": None if first_token_at is None
                    else round((first_token_at - started) * 1000, 3),
                    "total": round((ended - started) * 1000, 3),
                },
            }
        )


def _chunk_messages(rid: str, chunk: TextChunk, index: int, top: int) -> list[dict[str, Any]]:
    """One chunk's ``token`` message (with ``logprobs`` when asked) and ``tool_call``
    fragments."""
    out: list[dict[str, Any]] = []
    if chunk.text:
        message: dict[str, Any] = {"type": "token", "id": rid, "token": chunk.text, "index": index}
        if chunk.logprobs is not None:
            message["logprobs"] = logprobs_out(chunk.logprobs, top)
        out.append(message)
    out.extend({"type": "tool_call", "id": rid, **tool_call_out(d)} for d in chunk.tool_calls or ())
    return out


def _whole_calls(deltas: list[ToolCallDelta]) -> dict[str, Any]:
    """``{"tool_calls": [...]}`` of the whole calls for ``complete`` (empty when none)."""
    calls = merge_tool_call_deltas(deltas)
    if not calls:
        return {}
    return {"tool_calls": [tool_call_out(ToolCallDelta(i, c.id, c.name, c.arguments))
                           for i, c in enumerate(calls)]}


def build_ws_router(core: GatewayCore) -> APIRouter:
    router = APIRouter()

    @router.websocket("/ws")
    async def websocket_endpoint(websocket: WebSocket) -> None:
        await WebSocketSession(core, websocket).run()

    return router

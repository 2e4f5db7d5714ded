"""Fake Anthropic and Gemini upstreams: real aiohttp servers on 127.0.0.1 speaking each
provider's wire format (JSON and SSE), built on :class:`tests.fake_openai.FakeOpenAI`'s
lifecycle, behaviours (status, Retry-After, delays, stalls, ...) and key checks.

* :class:`FakeAnthropic`: ``POST /v1/messages`` (``x-api-key``, ``anthropic-version``),
  streaming the documented event sequence ``message_start``, ``content_block_start``,
  ``ping``, ``content_block_delta``…, ``content_block_stop``, ``message_delta``,
  ``message_stop``; errors as ``{"type":"error","error":{"type","message"}}``.
* :class:`FakeGemini`: ``POST /v1beta/models/{model}:generateContent`` and
  ``:streamGenerateContent?alt=sse`` (``x-goog-api-key``), ``:batchEmbedContents``; errors
  as ``{"error":{"code","message","status","details"}}`` (a bad key is a 400 with reason
  ``API_KEY_INVALID``, as Google answers).

The reply and usage rules are the OpenAI fake's: :func:`reply_tokens` of the last user
text, prompt tokens from :func:`prompt_tokens_for` over the turns (+ the system text).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any, Optional

from aiohttp import web

from tests.fake_agent import TOOL_CALL_TOKENS, read_anthropic, read_gemini
from tests.fake_openai import Behaviour, FakeOpenAI, fake_embedding, prompt_tokens_for, reply_tokens

__all__ = ["FakeAnthropic", "FakeGemini"]

_ANTHROPIC_ERRORS = {
    400: ("invalid_request_error", "prompt is too long: 210000 tokens > 200000 maximum"),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the resource."),
    404: ("not_found_error", "model: {model}"),
    429: ("rate_limit_error", "Number of request tokens has exceeded your rate limit."),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}
_GEMINI_ERRORS = {
    400: ("INVALID_ARGUMENT", "The input token count (1200000) exceeds the maximum number of "
          "tokens allowed (1048576)."),
    403: ("PERMISSION_DENIED", "Permission denied."),
    429: ("RESOURCE_EXHAUSTED", "Resource has been exhausted (e.g. check quota)."),
    500: ("INTERNAL", "An internal error has occurred."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
}


class _Base(FakeOpenAI):
    def _tokens(self, b: Behaviour, last: str, limit: Any) -> tuple[list[str], bool]:
        tokens = (
            [w if i == 0 else " " + w for i, w in enumerate(b.reply_text.split(" "))]
            if b.reply_text is not None else reply_tokens(last, b.reply_tokens)
        )
        if isinstance(limit, int) and len(tokens) > limit:
            return tokens[:limit], True
        return tokens, False

    async def _pace(self, b: Behaviour, i: int, request: web.Request) -> bool:
        """Before content chunk ``i``: stall/delay/disconnect; False when disconnected."""
        if b.stall_after_chunks is not None and i >= b.stall_after_chunks:
            await self._hang()
        if b.token_delay_s:
            await asyncio.sleep(b.token_delay_s)
        if b.disconnect_after_chunks is not None and i >= b.disconnect_after_chunks:
            assert request.transport is not None
            request.transport.close()
            return False
        return True

    def _check_key(self, key: str, b: Behaviour) -> bool:
        ok = not ((b.expected_api_key is not None and key != b.expected_api_key)
                  or (self.valid_keys is not None and key not in self.valid_keys))
        if not ok:
            self.unauthorized += 1
        return ok


class FakeAnthropic(_Base):
    """See the module docstring. ``url`` is the base URL (``http://127.0.0.1:PORT``)."""

    @property
    def url(self) -> str:
        return super().url.removesuffix("/v1")

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self._messages)

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        self._record(request, body)
        b = self._queue.pop(0) if self._queue else self._base
        if b.headers_delay_s:
            await asyncio.sleep(b.headers_delay_s)
        key = request.headers.get("x-api-key", "")
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or (
                "max_tokens" not in body):
            return _anthropic_error(400, "invalid_request_error",
                                    "messages and max_tokens: Field required")
        if not self._check_key(key, b):
            return _anthropic_error(401, "authentication_error", "invalid x-api-key")
        if b.status != 200:
            etype, message = _ANTHROPIC_ERRORS.get(b.status, ("api_error", f"Error {b.status}"))
            return _anthropic_error(
                b.status, b.error_code or etype,
                (b.error_message or message).format(model=body.get("model")),
                {"retry-after": b.retry_after} if b.retry_after else None)
        messages = body["messages"]
        last = str(messages[-1].get("content", "")) if messages else ""
        self.key_log.append((last, key))
        turns = list(messages)
        if body.get("system"):
            turns.append({"content": body["system"]})
        usage_in = prompt_tokens_for(turns)
        agent = read_anthropic(body)
        if agent is not None and agent.text is not None:
            b = dataclasses.replace(b, reply_text=agent.text)
        tokens, cut = self._tokens(b, last, body.get("max_tokens"))
        stop = b.finish_reason or ("max_tokens" if cut else "end_turn")
        call = agent if agent is not None and agent.tool else None
        block: dict[str, Any] = {"type": "text", "text": "".join(tokens)}
        deltas = [{"type": "text_delta", "text": text} for text in tokens]
        if call:
            stop, tokens = "tool_use", ["x"] * TOOL_CALL_TOKENS
            block = {"type": "tool_use", "id": "toolu_fake0", "name": call.tool, "input": {}}
            half = len(call.arguments) // 2
            deltas = [{"type": "input_json_delta", "partial_json": piece}
                      for piece in (call.arguments[:half], call.arguments[half:])]
        cached = min(b.cached_tokens, usage_in)
        usage = {"input_tokens": usage_in - cached, "cache_creation_input_tokens": 0,
                 "cache_read_input_tokens": cached}
        msg_id = "msg_fake01"
        if not body.get("stream"):
            whole = {**block, "input": call.args} if call else block
            return web.json_response({
                "id": msg_id, "type": "message", "role": "assistant", "model": body.get("model"),
                "content": [whole], "stop_reason": stop, "stop_sequence": None,
                "usage": {**usage, "output_tokens": len(tokens)},
            })
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        self.open_streams += 1
        self.streams_started += 1
        finished = False
        try:
            await response.prepare(request)

            async def send(event: str, data: dict[str, Any]) -> None:
                await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())

            await send("message_start", {"type": "message_start", "message": {
                "id": msg_id, "type": "message", "role": "assistant", "content": [],
                "model": body.get("model"), "stop_reason": None, "stop_sequence": None,
                "usage": {**usage, "output_tokens": 1}}})
            start = {**block, "text": ""} if block["type"] == "text" else block
            await send("content_block_start", {"type": "content_block_start", "index": 0,
                                               "content_block": start})
            await send("ping", {"type": "ping"})
            for i, delta in enumerate(deltas):
                if b.error_after_chunks is not None and i >= b.error_after_chunks:
                    await send("error", {"type": "error", "error": {
                        "type": "overloaded_error", "message": "Overloaded"}})
                    finished = True
                    return response
                if not await self._pace(b, i, request):
                    return response
                await send("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                   "delta": delta})
            if b.stall_after_chunks is not None:
                await self._hang()
            await send("content_block_stop", {"type": "content_block_stop", "index": 0})
            await send("message_delta", {"type": "message_delta",
                                         "delta": {"stop_reason": stop, "stop_sequence": None},
                                         "usage": {"output_tokens": len(tokens)}})
            await send("message_stop", {"type": "message_stop"})
            await response.write_eof()
            finished = True
            return response
        finally:
            self.open_streams -= 1
            if not finished:
                self.streams_closed_by_client += 1


def _anthropic_error(status: int, etype: str, message: str,
                     headers: Optional[dict[str, str]] = None) -> web.Response:
    return web.json_response({"type": "error", "error": {"type": etype, "message": message}},
                             status=status, headers=headers)


class FakeGemini(_Base):
    """See the module docstring. ``url`` is the base URL (``http://127.0.0.1:PORT/v1beta``)."""

    @property
    def url(self) -> str:
        return super().url.removesuffix("/v1") + "/v1beta"

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{call}", self._call)

    async def _call(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        self._record(request, body)
        b = self._queue.pop(0) if self._queue else self._base
        if b.headers_delay_s:
            await asyncio.sleep(b.headers_delay_s)
        model, _, method = request.match_info["call"].partition(":")
        key = request.headers.get("x-goog-api-key", "")
        if not self._check_key(key, b):
            return _gemini_error(400, "INVALID_ARGUMENT",
                                 "API key not valid. Please pass a valid API key.",
                                 [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                   "reason": "API_KEY_INVALID", "domain": "googleapis.com"}])
        if b.status != 200:
            status, message = _GEMINI_ERRORS.get(b.status, ("UNKNOWN", f"Error {b.status}"))
            return _gemini_error(b.status, b.error_code or status, b.error_message or message,
                                 headers={"Retry-After": b.retry_after} if b.retry_after else None)
        if method == "batchEmbedContents":
            reqs = (body or {}).get("requests") or []
            return web.json_response({"embeddings": [
                {"values": fake_embedding(r["content"]["parts"][0]["text"])} for r in reqs]})
        if method not in ("generateContent", "streamGenerateContent"):
            return _gemini_error(404, "NOT_FOUND", f"Method {method} not found.")
        contents = (body or {}).get("contents")
        if not isinstance(contents, list) or not contents:
            return _gemini_error(400, "INVALID_ARGUMENT", "contents is not specified")
        texts = [{"content": " ".join(p.get("text", "") for p in c.get("parts", []))}
                 for c in contents]
        system = (body.get("systemInstruction") or {}).get("parts") or []
        if system:
            texts.append({"content": " ".join(p.get("text", "") for p in system)})
        last = texts[len(contents) - 1]["content"]
        self.key_log.append((last, key))
        limit = (body.get("generationConfig") or {}).get("maxOutputTokens")
        agent = read_gemini(body)
        if agent is not None and agent.text is not None:
            b = dataclasses.replace(b, reply_text=agent.text)
        tokens, cut = self._tokens(b, last, limit)
        finish = b.finish_reason or ("MAX_TOKENS" if cut else "STOP")
        prompt = prompt_tokens_for(texts)
        call = agent if agent is not None and agent.tool else None
        if call:
            tokens = ["x"] * TOOL_CALL_TOKENS

        def chunk(text: str, done: bool, sent: int) -> dict[str, Any]:
            part = {"functionCall": {"name": call.tool, "args": call.args}} if call else {
                "text": text}
            cand: dict[str, Any] = {"content": {"parts": [part], "role": "model"}, "index": 0}
            if done:
                cand["finishReason"] = finish
            usage: dict[str, Any] = {"promptTokenCount": prompt}
            if b.cached_tokens:
                usage["cachedContentTokenCount"] = min(b.cached_tokens, prompt)
            if sent:
                usage.update(candidatesTokenCount=sent, totalTokenCount=prompt + sent)
            return {"candidates": [cand], "usageMetadata": usage, "modelVersion": model}

        if method == "generateContent":
            return web.json_response(chunk("".join(tokens), True, len(tokens)))
        if call:
            tokens = [""]  # Gemini streams a call whole, in one event
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        self.open_streams += 1
        self.streams_started += 1
        finished = False
        try:
            await response.prepare(request)
            for i, text in enumerate(tokens):
                if b.error_after_chunks is not None and i >= b.error_after_chunks:
                    err = {"error": {"code": 503, "message": "The model is overloaded.",
                                     "status": "UNAVAILABLE"}}
                    await response.write(f"data: {json.dumps(err)}\n\n".encode())
                    finished = True
                    return response
                if not await self._pace(b, i, request):
                    return response
                last_one = i == len(tokens) - 1
                data = chunk(text, last_one, TOOL_CALL_TOKENS if call else i + 1)
                await response.write(f"data: {json.dumps(data)}\r\n\r\n".encode())
            if b.stall_after_chunks is not None:
                await self._hang()
            await response.write_eof()
            finished = True
            return response
        finally:
            self.open_streams -= 1
            if not finished:
                self.streams_closed_by_client += 1


def _gemini_error(status: int, rpc_status: str, message: str,
                  details: Optional[list[dict[str, Any]]] = None,
                  headers: Optional[dict[str, str]] = None) -> web.Response:
    error: dict[str, Any] = {"code": status, "message": message, "status": rpc_status}
    if details:
        error["details"] = details
    return web.json_response({"error": error}, status=status, headers=headers)

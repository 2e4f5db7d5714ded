"""A text engine over Google's Gemini API (``models/{model}:streamGenerateContent?alt=sse``).

Translation of the internal request (:mod:`.gemini_wire`): ``system`` turns become
``systemInstruction``; ``assistant`` turns become role ``model``, every other role
``user``; parts, tools, tool turns, JSON output and logprobs as that module says.
``generationConfig`` carries ``temperature``, ``topP``, ``maxOutputTokens``,
``stopSequences`` and ``seed``. The key goes in the ``x-goog-api-key`` header (never in
the URL, where it would reach access logs).

Stream: SSE whose ``data`` is a ``GenerateContentResponse``; the text of
``candidates[0].content.parts`` is one output per event; ``usageMetadata`` (cumulative)
gives ``promptTokenCount`` (of which ``cachedContentTokenCount`` were cached) and
``candidatesTokenCount`` (+ ``thoughtsTokenCount``, which is billed as output); a
``functionCall`` part is a whole tool call, and an answer with calls finishes
``tool_calls``; the stream has no end marker, so it ends when the body ends after a
``finishReason``. Finish reasons: ``STOP`` → ``stop``, ``MAX_TOKENS`` → ``length``,
``SAFETY``/``RECITATION``/``BLOCKLIST``/``PROHIBITED_CONTENT``/``SPII``/``IMAGE_SAFETY`` →
CONTENT_FILTERED, as is a ``promptFeedback.blockReason``.

Errors (``{"error":{"code","message","status","details"}}``): a 400 whose details carry
reason ``API_KEY_INVALID`` is an authentication failure (Gemini answers a bad key with
400, not 401), so it gets the same one-time credential refresh; ``RESOURCE_EXHAUSTED``
is 429; a 400 saying the input token count exceeds the maximum → CONTEXT_LENGTH_EXCEEDED.
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import quote

from deployments.engines.remote.engine import RemoteEngine, StreamState
from deployments.engines.remote.gemini_wire import build_generate_body, gemini_logprobs
from deployments.engines.remote.transport import UpstreamCall
from deployments.engines.remote.wire_util import synth_call_id
from serve_app.errors import AuthenticationFailed, InferenceFailed, TroupeError
from serve_app.protocol.internal import (
    EngineFinishReason,
    EngineOutput,
    GenerationRequest,
    TokenLogprob,
    ToolCallDelta,
)
from serve_app.settings import GeminiEngineConfig

__all__ = ["GeminiTextEngine", "build_generate_body"]

_FINISH: dict[str, EngineFinishReason] = {"STOP": "stop", "MAX_TOKENS": "length", "FINISH_REASON_UNSPECIFIED": "stop",
                                          "OTHER": "stop", "MALFORMED_FUNCTION_CALL": "stop"}
_FILTERED = frozenset({"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII",
                       "IMAGE_SAFETY", "LANGUAGE"})


class GeminiTextEngine(RemoteEngine):
    """See the module docstring."""

    provider = "gemini"

    def __init__(self, model_id: str, config: GeminiEngineConfig) -> None:
        super().__init__(model_id, config)
        base = config.base_url.rstrip("/")
        model = quote(config.model, safe="")
        self._url = f"{base}/models/{model}:streamGenerateContent?alt=sse"
        self._embed_url = f"{base}/models/{model}:batchEmbedContents"

    def _headers(self, secret: str) -> dict[str, str]:
        return {"x-goog-api-key": secret, "Content-Type": "application/json"}

    def build_http(self, request: GenerationRequest, secret: str) -> UpstreamCall:
        headers = self._headers(secret)
        headers["Accept"] = "text/event-stream"
        return UpstreamCall(self._url, headers, build_generate_body(request, self.context_length))

    def on_event(self, data: str, state: StreamState) -> Optional[EngineOutput]:
        event = self.event_json(data)
        if event is None:
            return None
        if isinstance(event.get("error"), dict):
            error = event["error"]
            status = int(error.get("code") or 500) if str(error.get("code", "")).isdigit() else 500
            raise self.mid_stream_error(error, status, kind=error.get("status"))
        text, calls, logprobs = self._absorb(event, state)
        if not text and not calls:
            return None
        state.reported += 1
        return EngineOutput(text, 1, state.prompt_tokens, logprobs=logprobs, tool_calls=calls)

    def on_json(self, body: Any, state: StreamState) -> list[EngineOutput]:
        if not isinstance(body, dict):
            raise InferenceFailed(
                f"The upstream provider of model '{self.model_id}' sent an answer that is "
                "not an object.", details={"provider": self.provider})
        text, calls, logprobs = self._absorb(body, state)
        if state.finish_reason is None:
            state.finish_reason = "stop"
        if not text and not calls:
            return []
        state.reported += 1
        return [EngineOutput(text, 1, state.prompt_tokens, logprobs=logprobs, tool_calls=calls)]

    def _absorb(self, event: dict[str, Any], state: StreamState) -> tuple[
            str, Optional[list[ToolCallDelta]], Optional[list[TokenLogprob]]]:
        """Usage, finish reason, text, tool calls and logprobs of one GenerateContentResponse."""
        usage = event.get("usageMetadata")
        if isinstance(usage, dict):
            state.prompt_tokens = int(usage.get("promptTokenCount") or 0)
            state.cached_tokens = int(usage.get("cachedContentTokenCount") or 0)
            state.reasoning_tokens = int(usage.get("thoughtsTokenCount") or 0)
            if "candidatesTokenCount" in usage or "thoughtsTokenCount" in usage:
                state.completion_tokens = int(usage.get("candidatesTokenCount") or 0) + int(
                    usage.get("thoughtsTokenCount") or 0)
        feedback = event.get("promptFeedback") or {}
        if feedback.get("blockReason"):
            raise self.content_error(f"the prompt was blocked ({feedback['blockReason']})")
        text, calls, logprobs = "", [], None
        for candidate in (event.get("candidates") or ())[:1]:
            for part in ((candidate.get("content") or {}).get("parts") or ()):
                if not isinstance(part, dict) or part.get("thought"):
                    continue
                text += part.get("text") or ""
                if isinstance(part.get("functionCall"), dict):
                    calls.append(self._call(part["functionCall"], state))
            logprobs = gemini_logprobs(candidate)
            reason = candidate.get("finishReason")
            if reason in _FILTERED:
                raise self.content_error(f"the answer was stopped (finishReason {reason})")
            if reason:
                made_calls = state.extra.get("calls", 0) > 0
                state.finish_reason = "tool_calls" if made_calls else _FINISH.get(reason, "stop")
        return text, calls or None, logprobs

    @staticmethod
    def _call(call: dict[str, Any], state: StreamState) -> ToolCallDelta:
        """One whole function call, numbered in the answer, with its id or a stable one."""
        index = state.extra.get("calls", 0)
        state.extra["calls"] = index + 1
        call_id = call.get("id") or synth_call_id(state.request_id, index)
        return ToolCallDelta(index, call_id, call.get("name"), json.dumps(call.get("args") or {}))

    def classify_error(
        self, status: int, error: dict[str, Any], headers: Any
    ) -> Optional[TroupeError]:
        message = str(error.get("message") or f"HTTP {status}")
        reasons = {d.get("reason") for d in error.get("details") or () if isinstance(d, dict)}
        if "API_KEY_INVALID" in reasons:
            return AuthenticationFailed(
                f"The upstream provider of model '{self.model_id}' rejected the API key "
                f"(credential {self.config.credential_name!r}): {message}. Set a valid key in "
                f"${self.config.api_key_env}, the secrets file, or with POST /admin/credentials.",
            )
        low = message.lower()
        if status == 400 and "token count" in low and "exceeds the maximum" in low:
            return self.context_error(message, "messages")
        if "BILLING" in str(reasons) or (status == 403 and "billing" in low):
            return self.quota_error(message)
        return None

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Embed ``texts`` (``batchEmbedContents``); Gemini reports no token usage (0)."""
        name = f"models/{self.config.model}"
        body = {"requests": [{"model": name, "content": {"parts": [{"text": t}]}}
                             for t in texts]}
        data = await self.unary_json(self._embed_url, self._headers, body)
        return [list(map(float, e["values"])) for e in data.get("embeddings") or ()], 0

"""A text engine over Anthropic's Messages API (``POST {base_url}/v1/messages``).

Translation of the internal request: ``system`` turns are joined into the top-level
``system`` string; other roles become ``user``/``assistant`` turns (any role but
``assistant`` is sent as ``user``); ``max_tokens`` is required upstream, so it is the
request's, else the model's default, else the engine's ``default_max_tokens``;
``temperature`` is clamped to Anthropic's 0..1; ``top_p`` is sent only when not 1;
``stop`` becomes ``stop_sequences``. Headers: ``x-api-key`` and ``anthropic-version``.

Stream events (SSE; the type is repeated inside each JSON ``data``): ``message_start``
(``message.usage.input_tokens`` plus cache tokens → prompt tokens), ``content_block_delta``
with a ``text_delta`` → one output, ``message_delta`` (``delta.stop_reason``, cumulative
``usage.output_tokens``), ``message_stop`` → the end, ``ping`` ignored, ``error`` → a
classified error. Stop reasons: ``end_turn``/``stop_sequence``/``tool_use``/``pause_turn``
→ ``stop``, ``max_tokens`` → ``length``, ``refusal`` → CONTENT_FILTERED.

Errors (``{"type":"error","error":{"type","message"}}``) map by status and ``error.type``:
``billing_error`` → PAYMENT_REQUIRED; a 400 whose message says the prompt is too long →
CONTEXT_LENGTH_EXCEEDED (Anthropic gives that case no machine-readable code);
``overloaded_error`` (529) and ``api_error`` are retried like any 5xx.
"""

from __future__ import annotations

from typing import Any, Optional

from deployments.engines.remote.engine import RemoteEngine, StreamState
from deployments.engines.remote.transport import UpstreamCall
from serve_app.errors import InferenceFailed, TroupeError
from serve_app.protocol.internal import EngineFinishReason, EngineOutput, GenerationRequest
from serve_app.settings import AnthropicEngineConfig

__all__ = ["AnthropicTextEngine", "build_messages_body", "anthropic_usage"]

_STOP: dict[str, EngineFinishReason] = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "stop",
                                        "pause_turn": "stop", "max_tokens": "length"}


def build_messages_body(
    model: str, request: GenerationRequest, default_max_tokens: int, stream: bool = True
) -> dict[str, Any]:
    """The Messages API body for ``request``."""
    system: list[str] = []
    messages: list[dict[str, Any]] = []
    if request.messages is not None:
        for m in request.messages:
            if m.role in ("system", "developer"):
                system.append(m.content)
            else:
                role = "assistant" if m.role == "assistant" else "user"
                messages.append({"role": role, "content": m.content})
    else:
        messages.append({"role": "user", "content": request.prompt or ""})
    sp = request.sampling
    max_tokens = sp.max_tokens or sp.default_max_tokens or default_max_tokens
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": messages,
        "temperature": min(1.0, max(0.0, sp.temperature)),
        "stream": stream,
    }
    if system:
        body["system"] = "\n\n".join(system)
    if sp.top_p != 1.0:
        body["top_p"] = sp.top_p
    if sp.stop:
        body["stop_sequences"] = list(sp.stop)
    if request.service_tier is not None:
        body["service_tier"] = request.service_tier
    return body


def anthropic_usage(usage: dict[str, Any]) -> int:
    """Prompt tokens of an Anthropic usage object (uncached + cache writes + cache reads)."""
    return sum(int(usage.get(k) or 0) for k in (
        "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))


class AnthropicTextEngine(RemoteEngine):
    """See the module docstring."""

    provider = "anthropic"

    def __init__(self, model_id: str, config: AnthropicEngineConfig) -> None:
        super().__init__(model_id, config)
        self._url = config.base_url.rstrip("/") + "/v1/messages"

    def build_http(self, request: GenerationRequest, secret: str) -> UpstreamCall:
        headers = {
            "x-api-key": secret,
            "anthropic-version": self.config.anthropic_version,
            "content-type": "application/json",
            "accept": "text/event-stream",
        }
        body = build_messages_body(self.config.model, request, self.config.default_max_tokens)
        return UpstreamCall(self._url, headers, body)

    def on_event(self, data: str, state: StreamState) -> Optional[EngineOutput]:
        event = self.event_json(data)
        if event is None:
            return None
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message") or {}
            state.prompt_tokens = anthropic_usage(message.get("usage") or {})
            return None
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            text = delta.get("text") if delta.get("type") == "text_delta" else None
            if not text:
                return None
            state.reported += 1
            return EngineOutput(text, 1, state.prompt_tokens)
        if kind == "message_delta":
            usage = event.get("usage") or {}
            if "output_tokens" in usage:
                state.completion_tokens = int(usage["output_tokens"] or 0)
            if usage.get("input_tokens") is not None:
                state.prompt_tokens = anthropic_usage(usage)
            self._stop((event.get("delta") or {}).get("stop_reason"), state)
            return None
        if kind == "message_stop":
            state.done = True
            return None
        if kind == "error":
            error = event.get("error") or {}
            raise self.mid_stream_error(error, kind=error.get("type"))
        return None  # ping, content_block_start/stop, unknown future events

    def on_json(self, body: Any, state: StreamState) -> list[EngineOutput]:
        if not isinstance(body, dict) or body.get("type") != "message":
            raise InferenceFailed(
                f"The upstream provider of model '{self.model_id}' sent an answer that is "
                "not a message.", details={"provider": self.provider})
        usage = body.get("usage") or {}
        state.prompt_tokens = anthropic_usage(usage)
        if "output_tokens" in usage:
            state.completion_tokens = int(usage["output_tokens"] or 0)
        self._stop(body.get("stop_reason") or "end_turn", state)
        text = "".join(b.get("text") or "" for b in body.get("content") or ()
                       if isinstance(b, dict) and b.get("type") == "text")
        if not text:
            return []
        state.reported += 1
        return [EngineOutput(text, 1, state.prompt_tokens)]

    def _stop(self, reason: Optional[str], state: StreamState) -> None:
        if not reason:
            return
        if reason == "refusal":
            raise self.content_error("the model refused (stop_reason refusal)")
        state.finish_reason = _STOP.get(reason, "stop")

    def classify_error(
        self, status: int, error: dict[str, Any], headers: Any
    ) -> Optional[TroupeError]:
        etype = error.get("type")
        message = str(error.get("message") or f"HTTP {status}")
        if etype == "billing_error":
            return self.quota_error(message)
        if etype == "invalid_request_error" and "prompt is too long" in message.lower():
            return self.context_error(message)
        return None

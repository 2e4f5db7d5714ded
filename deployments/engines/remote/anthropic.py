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
classified error. Stop reasons: ``end_turn``/``stop_sequence``/``pause_turn`` → ``stop``,
``tool_use`` → ``tool_calls``, ``max_tokens`` → ``length``, ``refusal`` →
CONTENT_FILTERED. Usage: ``cache_read_input_tokens`` are the cached prompt tokens.

Tools, tool turns, images and structured output are translated by :mod:`.anthropic_wire`.
In the answer a ``tool_use`` block's ``content_block_start`` is a :class:`ToolCallDelta`
with its id and name and each ``input_json_delta`` one with an argument fragment; the
forced structured-output tool's input is streamed as text instead (finish ``stop``).

Errors (``{"type":"error","error":{"type","message"}}``) map by status and ``error.type``:
``billing_error`` → PAYMENT_REQUIRED; a 400 whose message says the prompt is too long →
CONTEXT_LENGTH_EXCEEDED (Anthropic gives that case no machine-readable code);
``overloaded_error`` (529) and ``api_error`` are retried like any 5xx.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from deployments.engines.remote.anthropic_wire import JSON_TOOL, anthropic_usage, build_messages_body
from deployments.engines.remote.engine import RemoteEngine, StreamState
from deployments.engines.remote.transport import UpstreamCall
from deployments.engines.remote.wire_util import ToolIndex
from serve_app.errors import InferenceFailed, TroupeError
from serve_app.protocol.internal import (
    EngineFinishReason,
    EngineOutput,
    GenerationRequest,
    ToolCallDelta,
)
from serve_app.settings import AnthropicEngineConfig

__all__ = ["AnthropicTextEngine", "build_messages_body", "anthropic_usage"]

_STOP: dict[str, EngineFinishReason] = {"end_turn": "stop", "stop_sequence": "stop",
                                        "tool_use": "tool_calls",
                                        "pause_turn": "stop", "max_tokens": "length"}


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
            self._usage(message.get("usage") or {}, state)
            return None
        if kind == "content_block_start":
            return self._block_start(event, state)
        if kind == "content_block_delta":
            return self._block_delta(event, state)
        if kind == "message_delta":
            usage = event.get("usage") or {}
            if "output_tokens" in usage:
                state.completion_tokens = int(usage["output_tokens"] or 0)
            if usage.get("input_tokens") is not None:
                self._usage(usage, state)
            self._stop((event.get("delta") or {}).get("stop_reason"), state)
            return None
        if kind == "message_stop":
            state.done = True
            return None
        if kind == "error":
            error = event.get("error") or {}
            raise self.mid_stream_error(error, kind=error.get("type"))
        return None  # ping, content_block_stop, unknown future events

    def _block_start(self, event: dict[str, Any], state: StreamState) -> Optional[EngineOutput]:
        block = event.get("content_block") or {}
        if block.get("type") != "tool_use":
            return None
        if block.get("name") == JSON_TOOL:
            state.extra.setdefault("json_blocks", set()).add(event.get("index"))
            return None
        tools: ToolIndex = state.extra.setdefault("tools", ToolIndex())
        call = ToolCallDelta(tools.open(event.get("index")), block.get("id"), block.get("name"))
        state.reported += 1
        return EngineOutput("", 1, state.prompt_tokens, tool_calls=[call])

    def _block_delta(self, event: dict[str, Any], state: StreamState) -> Optional[EngineOutput]:
        delta = event.get("delta") or {}
        kind = delta.get("type")
        text = delta.get("text") if kind == "text_delta" else None
        calls = None
        if kind == "input_json_delta" and delta.get("partial_json"):
            index = event.get("index")
            if index in state.extra.get("json_blocks", ()):
                text = delta["partial_json"]
            else:
                slot = state.extra.setdefault("tools", ToolIndex()).of(index)
                calls = [ToolCallDelta(slot or 0, arguments=delta["partial_json"])]
        if not text and not calls:
            return None
        state.reported += 1
        return EngineOutput(text or "", 1, state.prompt_tokens, tool_calls=calls)

    @staticmethod
    def _usage(usage: dict[str, Any], state: StreamState) -> None:
        state.prompt_tokens = anthropic_usage(usage)
        state.cached_tokens = int(usage.get("cache_read_input_tokens") or 0)

    def on_json(self, body: Any, state: StreamState) -> list[EngineOutput]:
        if not isinstance(body, dict) or body.get("type") != "message":
            raise InferenceFailed(
                f"The upstream provider of model '{self.model_id}' sent an answer that is "
                "not a message.", details={"provider": self.provider})
        usage = body.get("usage") or {}
        self._usage(usage, state)
        if "output_tokens" in usage:
            state.completion_tokens = int(usage["output_tokens"] or 0)
        text, calls = "", list[ToolCallDelta]()
        for block in body.get("content") or ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text":
                text += block.get("text") or ""
            elif block.get("type") == "tool_use" and block.get("name") == JSON_TOOL:
                text += json.dumps(block.get("input") or {})
                state.extra["json_blocks"] = {0}
            elif block.get("type") == "tool_use":
                calls.append(ToolCallDelta(len(calls), block.get("id"), block.get("name"),
                                           json.dumps(block.get("input") or {})))
                state.extra["tools"] = len(calls)
        self._stop(body.get("stop_reason") or "end_turn", state)
        if not text and not calls:
            return []
        state.reported += 1
        return [EngineOutput(text, 1, state.prompt_tokens, tool_calls=calls or None)]

    def _stop(self, reason: Optional[str], state: StreamState) -> None:
        if not reason:
            return
        if reason == "refusal":
            raise self.content_error("the model refused (stop_reason refusal)")
        if reason == "tool_use" and state.extra.get("json_blocks") and not state.extra.get("tools"):
            reason = "end_turn"  # only the structured-output tool was used: a plain answer
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

"""Anthropic Messages API wire types: the request model, the message object and stream events.

Pure data: pydantic and orjson only, no gateway imports, so a remote Anthropic engine can
reuse the same types to speak to the real API. Content blocks, tools and tool choice live in
:mod:`serve_app.protocol.anthropic_tools`; documents, thinking and server tools are refused
with a 400 that names the field.

Request fields the gateway acts on are typed and validated (a bad value is a 400 naming
the field); unknown fields are accepted and logged, as elsewhere. ``top_k`` is validated
and accepted but not applied: no text engine here exposes it (documented in the README).

Stream events, in order (each an SSE ``event:`` name with a JSON ``data:`` whose ``type``
repeats the name)::

    message_start · content_block_start · ping · content_block_delta (text_delta) …
    content_block_stop · [content_block_start (tool_use) · content_block_delta
    (input_json_delta) … · content_block_stop]* · message_delta (stop_reason, usage) ·
    message_stop

An error after the stream started is one ``error`` event in the error envelope.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.protocol.anthropic_tools import AnthropicTool, AnthropicToolChoice, ContentBlock
from serve_app.protocol.internal import ResponseFormat
from serve_app.protocol.openai_tools import check_json_schema

__all__ = [
    "MESSAGES_EXAMPLE",
    "ANTHROPIC_ERROR_TYPES",
    "TextBlock",
    "AnthropicMessage",
    "MessagesRequest",
    "StopReason",
    "stop_reason_of",
    "message_id",
    "message_object",
    "error_envelope",
    "MessageStreamEncoder",
]

MESSAGES_EXAMPLE = (
    '{"model": "smollm2-135m", "max_tokens": 64, '
    '"messages": [{"role": "user", "content": "Hello"}]}'
)

#: Anthropic's error ``type`` for an HTTP status (its documented table).
ANTHROPIC_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Lenient):
    """A content block; only ``text`` blocks can be served by text models."""

    type: str
    text: Optional[str] = None


def _check_text_blocks(blocks: list[TextBlock], where: str) -> list[TextBlock]:
    for i, block in enumerate(blocks):
        if block.type != "text":
            raise ValueError(
                f"{where} block {i} has type {block.type!r}; this gateway serves text models "
                "and accepts only blocks of type 'text' (no images, documents or tool blocks)"
            )
        if block.text is None:
            raise ValueError(f"{where} block {i} of type 'text' needs a 'text' field")
    return blocks


class AnthropicMessage(_Lenient):
    """One turn: ``user`` or ``assistant``, content as a string or a list of blocks."""

    role: Literal["user", "assistant"]
    content: Union[str, list[ContentBlock]]

    @field_validator("content")
    @classmethod
    def _non_empty(cls, value):
        if isinstance(value, list) and not value:
            raise ValueError("content must be a non-empty string or list of blocks")
        return value


class MessagesRequest(_Lenient):
    """``POST /v1/messages``. ``max_tokens`` is required, as in Anthropic's API."""

    model: str = Field(..., min_length=1, max_length=256)
    messages: list[AnthropicMessage] = Field(..., min_length=1)
    max_tokens: int = Field(..., ge=1)
    system: Union[str, list[TextBlock], None] = None
    temperature: Optional[float] = Field(None, ge=0, le=1)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=0)
    stop_sequences: Optional[list[str]] = Field(None, max_length=16)
    stream: Optional[bool] = False
    metadata: Optional[dict[str, Any]] = None
    tools: Optional[list[AnthropicTool]] = Field(None, max_length=128)
    tool_choice: Optional[AnthropicToolChoice] = None
    thinking: Optional[dict[str, Any]] = None
    output_config: Optional[dict[str, Any]] = None
    #: The structured-outputs beta's spelling of ``output_config.format``.
    output_format: Optional[dict[str, Any]] = None
    #: Anthropic's ``auto``/``standard_only``, or Troupe's deadline-aware tier routing.
    service_tier: Optional[str] = Field(None, max_length=32)
    start_within: Optional[str] = Field(None, max_length=32)

    @field_validator("system")
    @classmethod
    def _system_text_only(cls, value):
        if isinstance(value, list):
            _check_text_blocks(value, "system")
        return value

    @field_validator("stop_sequences")
    @classmethod
    def _non_empty_stops(cls, value):
        if value and any(not s for s in value):
            raise ValueError("stop sequences must be non-empty strings")
        return value

    @field_validator("thinking")
    @classmethod
    def _no_thinking(cls, value):
        if value and value.get("type") not in (None, "disabled"):
            raise ValueError(
                "extended thinking is not supported here; omit 'thinking' or send "
                '{"type": "disabled"}'
            )
        return value

    @field_validator("output_config")
    @classmethod
    def _output_config(cls, value):
        if value and value.get("format") is not None:
            _json_format(value["format"])
        return value

    @field_validator("output_format")
    @classmethod
    def _output_format(cls, value):
        if value is not None:
            _json_format(value)
        return value

    def response_format(self) -> Optional[ResponseFormat]:
        """The JSON-only mode, when ``output_config.format`` or ``output_format`` asks for it."""
        fmt = (self.output_config or {}).get("format") or self.output_format
        return None if fmt is None else _json_format(fmt)

    @model_validator(mode="after")
    def _turn_order(self) -> "MessagesRequest":
        if self.messages[0].role != "user":
            raise ValueError(
                "the first message must have role 'user' (put instructions in the top-level "
                "'system' field, not in an assistant turn)"
            )
        if self.messages[-1].role != "user":
            raise ValueError(
                "the last message must have role 'user': continuing a partial assistant turn "
                "(prefill) is not supported by this gateway"
            )
        return self

    def system_text(self) -> Optional[str]:
        """The system prompt as one string (text blocks joined by newlines), or None."""
        if self.system is None:
            return None
        if isinstance(self.system, str):
            return self.system or None
        return "\n".join(b.text or "" for b in self.system) or None

    def stop_tuple(self) -> tuple[str, ...]:
        return tuple(self.stop_sequences or ())


def _json_format(fmt: Any) -> ResponseFormat:
    """``{"type": "json_schema", "schema": {...}}`` as a response format (ValueError else)."""
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise ValueError("format must be {\"type\": \"json_schema\", \"schema\": {...}}")
    schema = check_json_schema(fmt.get("schema"), "format.schema")
    return ResponseFormat("json_schema", schema, None, True)


def stop_reason_of(finish_reason: str, stop_sequence: Optional[str]) -> StopReason:
    """Map an internal finish reason to Anthropic's ``stop_reason``."""
    if finish_reason == "length":
        return "max_tokens"
    if finish_reason == "tool_calls":
        return "tool_use"
    if stop_sequence:
        return "stop_sequence"
    return "end_turn"


def message_id(request_id: str) -> str:
    """A ``msg_…`` id derived from the gateway's request id (so logs line up)."""
    return "msg_" + request_id.removeprefix("req_").replace("-", "")


def _usage(input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """Anthropic's usage: ``input_tokens`` excludes what was read from the prompt cache."""
    return {
        "input_tokens": input_tokens - cached_tokens,
        "output_tokens": output_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached_tokens,
    }


def message_object(
    msg_id: str,
    model: str,
    text: str,
    stop_reason: Optional[StopReason],
    stop_sequence: Optional[str],
    input_tokens: int,
    output_tokens: int,
    tool_use: Optional[list[dict[str, Any]]] = None,
    cached_tokens: int = 0,
) -> dict[str, Any]:
    """The non-streamed ``message`` object (also ``message_start``'s payload, empty)."""
    content = [{"type": "text", "text": text}] if text or (stop_reason and not tool_use) else []
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content + list(tool_use or ()),
        "stop_reason": stop_reason,
        "stop_sequence": stop_sequence,
        "usage": _usage(input_tokens, output_tokens, cached_tokens),
    }


def error_envelope(
    error_type: str, message: str, request_id: Optional[str] = None
) -> dict[str, Any]:
    """Anthropic's error body: ``{"type": "error", "error": {"type", "message"}}``."""
    body: dict[str, Any] = {"type": "error", "error": {"type": error_type, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


class MessageStreamEncoder:
    """Builds the SSE events of one streamed message as ``(event name, JSON text)`` pairs.

    Stateless apart from the running counts; the caller decides when each event is sent.
    JSON is built with orjson from small dicts (no pydantic on the way out).
    """

    def __init__(self, msg_id: str, model: str) -> None:
        self.msg_id = msg_id
        self.model = model

    @staticmethod
    def _event(name: str, payload: dict[str, Any]) -> tuple[str, str]:
        return name, orjson.dumps(payload).decode()

    def start(self, input_tokens: int) -> list[tuple[str, str]]:
        """``message_start``, ``content_block_start`` and one ``ping``."""
        message = message_object(self.msg_id, self.model, "", None, None, input_tokens, 0)
        return [
            self._event("message_start", {"type": "message_start", "message": message}),
            self._event(
                "content_block_start",
                {"type": "content_block_start", "index": 0,
                 "content_block": {"type": "text", "text": ""}},
            ),
            ("ping", '{"type":"ping"}'),
        ]

    def delta(self, text: str) -> tuple[str, str]:
        return "content_block_delta", (
            '{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":%s}}'
            % orjson.dumps(text).decode()
        )

    @staticmethod
    def block_stop(index: int) -> tuple[str, str]:
        return "content_block_stop", '{"type":"content_block_stop","index":%d}' % index

    def tool_start(self, index: int, call_id: str, name: str) -> tuple[str, str]:
        """A ``tool_use`` block opens at ``index`` (its input arrives as JSON fragments)."""
        return self._event("content_block_start", {
            "type": "content_block_start", "index": index,
            "content_block": {"type": "tool_use", "id": call_id, "name": name, "input": {}}})

    def tool_delta(self, index: int, partial_json: str) -> tuple[str, str]:
        return self._event("content_block_delta", {
            "type": "content_block_delta", "index": index,
            "delta": {"type": "input_json_delta", "partial_json": partial_json}})

    def finish(
        self,
        stop_reason: StopReason,
        stop_sequence: Optional[str],
        input_tokens: int,
        output_tokens: int,
        open_block: Optional[int] = 0,
        cached_tokens: int = 0,
    ) -> list[tuple[str, str]]:
        """``content_block_stop`` (of the block still open), ``message_delta`` (reason +
        usage) and ``message_stop``."""
        return [
            *([self.block_stop(open_block)] if open_block is not None else []),
            self._event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                    "usage": {"input_tokens": input_tokens - cached_tokens,
                              "output_tokens": output_tokens,
                              **({"cache_read_input_tokens": cached_tokens}
                                 if cached_tokens else {})},
                },
            ),
            ("message_stop", '{"type":"message_stop"}'),
        ]

    @staticmethod
    def error(error_type: str, message: str, request_id: Optional[str] = None) -> tuple[str, str]:
        return "error", orjson.dumps(error_envelope(error_type, message, request_id)).decode()

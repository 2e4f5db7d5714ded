"""Pure helpers the provider wire translators share: data URLs, tool-call arguments,
synthesized call ids and the accumulated tool-call state of one answer."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Optional

from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import ChatMessage, GenerationRequest

__all__ = ["DataURL", "split_data_url", "arguments_object", "synth_call_id",
           "system_text", "call_names", "ToolIndex"]


@dataclass(frozen=True)
class DataURL:
    """A ``data:<mime>;base64,<data>`` URL taken apart."""

    mime: str
    data: str


def split_data_url(url: str) -> Optional[DataURL]:
    """The media type and base64 data of a data URL (None for any other URL)."""
    if not url.startswith("data:"):
        return None
    head, _, data = url[5:].partition(",")
    mime, _, encoding = head.partition(";")
    if encoding != "base64" or not data:
        raise InvalidRequest("An image data URL must be base64 (data:<type>;base64,...).",
                             param="messages")
    return DataURL(mime or "application/octet-stream", data)


def arguments_object(arguments: str, param: str = "messages") -> dict[str, Any]:
    """A tool call's JSON ``arguments`` text as the object Anthropic and Gemini want."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        raise InvalidRequest(
            f"A tool call's arguments are not JSON: {arguments[:80]!r}.", param=param
        ) from None
    if not isinstance(value, dict):
        raise InvalidRequest("A tool call's arguments must be a JSON object.", param=param)
    return value


def synth_call_id(request_id: str, index: int) -> str:
    """A stable id for a call the provider gave none (Gemini): the same request and index
    always get the same id, and ids differ across requests."""
    digest = hashlib.sha256(f"{request_id}:{index}".encode()).hexdigest()[:24]
    return f"call_{digest}"


def system_text(request: GenerationRequest) -> str:
    """The system and developer turns joined (Anthropic and Gemini take one system text)."""
    return "\n\n".join(m.content for m in request.messages or ()
                       if m.role in ("system", "developer"))


def call_names(messages: list[ChatMessage]) -> dict[str, str]:
    """tool_call_id -> function name over the conversation's assistant tool calls."""
    return {c.id: c.name for m in messages for c in m.tool_calls}


@dataclass
class ToolIndex:
    """Numbers a provider's tool-use blocks 0, 1, ... in the order they start (the
    ``index`` of :class:`~serve_app.protocol.internal.ToolCallDelta`)."""

    by_block: dict[Any, int] = field(default_factory=dict)

    def open(self, block: Any) -> int:
        """The call index of a newly started block."""
        self.by_block[block] = len(self.by_block)
        return self.by_block[block]

    def of(self, block: Any) -> Optional[int]:
        return self.by_block.get(block)

    def __len__(self) -> int:
        return len(self.by_block)

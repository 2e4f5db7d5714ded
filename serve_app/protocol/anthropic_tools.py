"""Anthropic Messages content blocks, tools and tool choice, and their one translation.

Blocks: ``text``, ``image`` (base64 or URL source), ``tool_use`` (an assistant's call) and
``tool_result`` (the user's answer to one). Tools are custom tools with an ``input_schema``;
``tool_choice`` is auto / any / tool / none. :func:`internal_messages` turns a request's
turns into the internal vocabulary: each ``tool_result`` becomes a ``tool`` turn answering
its ``tool_use_id``, each ``tool_use`` a tool call of the assistant turn.
"""

from __future__ import annotations

import json
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.protocol.internal import (
    ChatMessage,
    ImagePart,
    NamedTool,
    TextPart,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
)
from serve_app.protocol.openai_tools import FUNCTION_NAME, check_json_schema, unique_tool_specs

__all__ = [
    "ContentBlock",
    "AnthropicTool",
    "AnthropicToolChoice",
    "internal_messages",
    "tool_specs",
    "tool_choice_of",
    "tool_use_blocks",
]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ImageSource(_Lenient):
    type: Literal["base64", "url"]
    media_type: Optional[Literal["image/jpeg", "image/png", "image/gif", "image/webp"]] = None
    data: Optional[str] = None
    url: Optional[str] = None

    @model_validator(mode="after")
    def _complete(self) -> "ImageSource":
        if self.type == "base64" and (self.media_type is None or not self.data):
            raise ValueError("a base64 image source needs 'media_type' and 'data'")
        if self.type == "url" and not self.url:
            raise ValueError("a url image source needs 'url'")
        return self

    def url_of(self) -> str:
        return f"data:{self.media_type};base64,{self.data}" if self.type == "base64" else self.url or ""


class ContentBlock(_Lenient):
    """One content block of a turn (documents, thinking and server-tool blocks are refused)."""

    type: Literal["text", "image", "tool_use", "tool_result"]
    text: Optional[str] = None
    source: Optional[ImageSource] = None
    id: Optional[str] = Field(None, min_length=1, max_length=256)
    name: Optional[str] = Field(None, pattern=FUNCTION_NAME)
    input: Optional[dict[str, Any]] = None
    tool_use_id: Optional[str] = Field(None, min_length=1, max_length=256)
    content: Union[str, list["ContentBlock"], None] = None
    is_error: Optional[bool] = None

    @model_validator(mode="after")
    def _fields_of_type(self) -> "ContentBlock":
        need = {"text": ("text",), "image": ("source",), "tool_use": ("id", "name", "input"),
                "tool_result": ("tool_use_id",)}[self.type]
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.type!r} block needs {', '.join(repr(m) for m in missing)}")
        if self.type == "tool_result" and isinstance(self.content, list):
            if any(b.type not in ("text", "image") for b in self.content):
                raise ValueError("a tool_result's content holds only text and image blocks")
        return self

    def text_of(self) -> str:
        if self.type == "text":
            return self.text or ""
        if self.type == "tool_result":
            if isinstance(self.content, list):
                return "\n".join(b.text_of() for b in self.content if b.type == "text")
            return self.content or ""
        return ""


class AnthropicTool(_Lenient):
    """A custom tool (server tools such as web search are refused)."""

    type: Optional[Literal["custom"]] = None
    name: str = Field(..., pattern=FUNCTION_NAME)
    description: Optional[str] = None
    input_schema: dict[str, Any]

    @field_validator("input_schema")
    @classmethod
    def _schema(cls, value):
        check_json_schema(value, "input_schema")
        if value.get("type") != "object":
            raise ValueError("input_schema must have type 'object'")
        return value


class AnthropicToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: Optional[str] = Field(None, pattern=FUNCTION_NAME)
    disable_parallel_tool_use: Optional[bool] = None

    @model_validator(mode="after")
    def _named(self) -> "AnthropicToolChoice":
        if self.type == "tool" and self.name is None:
            raise ValueError("tool_choice of type 'tool' needs 'name'")
        return self


def _user_turns(blocks: list[ContentBlock]) -> list[ChatMessage]:
    """A user turn's tool results (as ``tool`` turns, first) and its text and images."""
    out = []
    for b in blocks:
        if b.type == "tool_result":
            text = b.text_of()
            out.append(ChatMessage("tool", f"Error: {text}" if b.is_error else text,
                                   tool_call_id=b.tool_use_id))
    parts = tuple(TextPart(b.text or "") if b.source is None else ImagePart(b.source.url_of())
                  for b in blocks if b.type == "text" or (b.type == "image" and b.source))
    if parts:
        text = "\n".join(p.text for p in parts if isinstance(p, TextPart))
        has_image = any(isinstance(p, ImagePart) for p in parts)
        out.append(ChatMessage("user", text, parts if has_image else ()))
    return out


def _assistant_turn(blocks: list[ContentBlock]) -> ChatMessage:
    if any(b.type in ("image", "tool_result") for b in blocks):
        raise ValueError("an assistant turn holds only text and tool_use blocks")
    text = "\n".join(b.text or "" for b in blocks if b.type == "text")
    calls = tuple(ToolCall(b.id or "", b.name or "", json.dumps(b.input))
                  for b in blocks if b.type == "tool_use")
    return ChatMessage("assistant", text, tool_calls=calls)


def cache_mark(blocks: Any) -> Optional[dict[str, Any]]:
    """The last ``cache_control`` among ``blocks`` (a breakpoint for the whole turn)."""
    marks = [(b.model_extra or {}).get("cache_control") for b in blocks or ()
             if isinstance(b, BaseModel)] if isinstance(blocks, list) else []
    return next((m for m in reversed(marks) if isinstance(m, dict)), None)


def internal_messages(system: Optional[str], messages: list[Any],
                      system_cache: Optional[dict[str, Any]] = None) -> list[ChatMessage]:
    """The request's turns in the internal vocabulary; consecutive plain text turns of one
    role are merged (Anthropic combines them the same way). ValueError on a bad turn.

    A turn's ``cache_control`` (on any of its blocks) becomes a breakpoint at the end of
    that turn, which the Anthropic engine sends back on the turn's last block."""
    out: list[ChatMessage] = ([ChatMessage("system", system, cache_control=system_cache)]
                              if system is not None else [])
    for message in messages:
        blocks = ([ContentBlock(type="text", text=message.content)]
                  if isinstance(message.content, str) else message.content)
        turns = _user_turns(blocks) if message.role == "user" else [_assistant_turn(blocks)]
        for turn in turns:
            last = out[-1] if out else None
            plain = not (turn.parts or turn.tool_calls or turn.tool_call_id)
            if (last is not None and last.role == turn.role and turn.role != "tool" and plain
                    and not (last.parts or last.tool_calls)):
                last.content = f"{last.content}\n\n{turn.content}"
            else:
                out.append(turn)
        mark = cache_mark(message.content)
        if mark is not None and out:
            out[-1].cache_control = mark
    return out


def tool_specs(tools: Optional[list[AnthropicTool]]) -> tuple[ToolSpec, ...]:
    return unique_tool_specs(ToolSpec(t.name, t.description, t.input_schema) for t in tools or ())


def tool_choice_of(choice: Optional[AnthropicToolChoice]) -> tuple[ToolChoice, bool]:
    """The internal tool choice and whether parallel calls are allowed."""
    if choice is None:
        return "auto", True
    parallel = not choice.disable_parallel_tool_use
    if choice.type == "tool":
        return NamedTool(choice.name or ""), parallel
    simple: dict[str, ToolChoice] = {"auto": "auto", "any": "required", "none": "none"}
    return simple[choice.type], parallel


def tool_use_blocks(deltas: Optional[list[ToolCallDelta]]) -> list[dict[str, Any]]:
    """``tool_use`` content blocks of a finished message (arguments parsed to ``input``)."""
    blocks = []
    for d in deltas or ():
        try:
            arguments = json.loads(d.arguments or "{}")
        except ValueError:  # a cut-off call (max_tokens): keep what there is as a string
            arguments = {"_partial": d.arguments}
        blocks.append({"type": "tool_use", "id": d.id, "name": d.name, "input": arguments})
    return blocks

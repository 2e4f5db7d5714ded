"""Responses API agent pieces: function tools, tool choice, ``text.format``, the
``function_call`` / ``function_call_output`` items, images, and their one translation.

Input items become internal turns: message items keep their text and ``input_image``
parts; consecutive ``function_call`` items become one assistant turn with tool calls; each
``function_call_output`` becomes a ``tool`` turn answering its ``call_id``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.protocol.internal import (
    ChatMessage,
    ImagePart,
    NamedTool,
    ResponseFormat,
    TextPart,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
)
from serve_app.protocol.openai_tools import FUNCTION_NAME, FunctionSpecIn, check_json_schema, unique_tool_specs

__all__ = [
    "FunctionTool",
    "NamedFunction",
    "TextFormat",
    "FunctionCallItem",
    "FunctionCallOutputItem",
    "internal_messages",
    "tool_specs",
    "tool_choice_of",
    "function_call_item",
]


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class _FunctionType(_Lenient):
    type: Literal["function"]


class FunctionTool(FunctionSpecIn, _FunctionType):
    """``{"type": "function", "name", "parameters", ...}`` (hosted tools are refused).

    ``type`` comes first (from the second base), so a hosted tool is refused by its type.
    """


class NamedFunction(_Lenient):
    type: Literal["function"]
    name: str = Field(..., pattern=FUNCTION_NAME)


class TextFormat(_Lenient):
    """``text.format``: text, json_object, or json_schema (name, schema, strict)."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    name: Optional[str] = Field(None, pattern=FUNCTION_NAME)
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None
    description: Optional[str] = None

    @field_validator("schema_")
    @classmethod
    def _schema(cls, value):
        return None if value is None else check_json_schema(value, "schema")

    def internal(self) -> Optional[ResponseFormat]:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat("json_object")
        if self.schema_ is None or self.name is None:
            raise ValueError("a json_schema format needs 'name' and 'schema'")
        return ResponseFormat("json_schema", self.schema_, self.name, bool(self.strict))


class FunctionCallItem(_Lenient):
    """A call the model made, replayed in ``input``."""

    type: Literal["function_call"]
    call_id: str = Field(..., min_length=1, max_length=256)
    name: str = Field(..., pattern=FUNCTION_NAME)
    arguments: str
    id: Optional[str] = None
    status: Optional[str] = None


class FunctionCallOutputItem(_Lenient):
    """The caller's result of a call: ``output`` is text (or text parts)."""

    type: Literal["function_call_output"]
    call_id: str = Field(..., min_length=1, max_length=256)
    output: Union[str, list[dict[str, Any]]]
    id: Optional[str] = None
    status: Optional[str] = None

    def text(self) -> str:
        if isinstance(self.output, str):
            return self.output
        return "\n".join(str(p.get("text", "")) for p in self.output)


def _message_turn(item: Any) -> ChatMessage:
    role = "system" if item.role == "developer" else item.role
    if isinstance(item.content, str):
        return ChatMessage(role, item.content)
    parts = tuple(ImagePart(p.image_url or "", p.detail) if p.type == "input_image"
                  else TextPart(p.text or "") for p in item.content)
    text = "\n".join(p.text for p in parts if isinstance(p, TextPart))
    has_image = any(isinstance(p, ImagePart) for p in parts)
    return ChatMessage(role, text, parts if has_image else ())


def internal_messages(instructions: Optional[str], items: Union[str, list[Any]]) -> list[ChatMessage]:
    """``instructions`` and ``input`` as internal turns (see the module docstring)."""
    out = [ChatMessage("system", instructions)] if instructions else []
    if isinstance(items, str):
        return [*out, ChatMessage("user", items)]
    for item in items:
        if isinstance(item, FunctionCallItem):
            call = ToolCall(item.call_id, item.name, item.arguments)
            last = out[-1] if out else None
            if last is not None and last.role == "assistant" and not last.parts:
                last.tool_calls = (*last.tool_calls, call)
            else:
                out.append(ChatMessage("assistant", "", tool_calls=(call,)))
        elif isinstance(item, FunctionCallOutputItem):
            out.append(ChatMessage("tool", item.text(), tool_call_id=item.call_id))
        else:
            out.append(_message_turn(item))
    return out


def tool_specs(tools: Optional[list[FunctionTool]]) -> tuple[ToolSpec, ...]:
    """A Responses request's function tools (see :func:`unique_tool_specs`)."""
    return unique_tool_specs(t.spec() for t in tools or ())


def tool_choice_of(choice: Union[str, NamedFunction, None]) -> ToolChoice:
    if choice is None:
        return "auto"
    if isinstance(choice, NamedFunction):
        return NamedTool(choice.name)
    return choice  # type: ignore[return-value]


def function_call_item(delta: ToolCallDelta, status: str, arguments: str) -> dict[str, Any]:
    """A ``function_call`` output item (``id`` derived from the call id)."""
    call_id = delta.id or ""
    return {"id": "fc_" + call_id.removeprefix("call_"), "type": "function_call",
            "status": status, "call_id": call_id, "name": delta.name or "",
            "arguments": arguments}

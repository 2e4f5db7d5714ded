"""A realtime session's conversation: ordered items in the protocol's wire shape.

Items are plain dicts as the client sees them (``conversation.item.*`` events carry
them as they are). The text model sees the conversation as chat messages: user audio by
its transcript, assistant audio by what was actually played (a truncated item keeps
only the words heard), ``function_call`` items as the assistant's tool calls (consecutive
calls in one turn) and ``function_call_output`` items as tool turns answering a call id.
"""

from __future__ import annotations

import secrets
from typing import Any, Optional

from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import ChatMessage, ToolCall

__all__ = ["Conversation", "function_call_item", "message_item", "new_id"]

#: Content part types, and the role that may send each.
_TEXT_KEYS = {"input_text": "text", "output_text": "text", "input_audio": "transcript",
              "output_audio": "transcript", "text": "text", "audio": "transcript"}
_ROLE_PARTS = {"user": {"input_text", "input_audio"}, "system": {"input_text"},
               "assistant": {"output_text", "output_audio", "text", "audio"}}
MAX_ITEMS = 1000


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def message_item(role: str, content: list[dict[str, Any]], status: str = "completed",
                 item_id: Optional[str] = None) -> dict[str, Any]:
    return {"id": item_id or new_id("item"), "object": "realtime.item", "type": "message",
            "status": status, "role": role, "content": content}


def function_call_item(call_id: str, name: str, arguments: str = "", status: str = "in_progress",
                       item_id: Optional[str] = None) -> dict[str, Any]:
    return {"id": item_id or new_id("item"), "object": "realtime.item", "type": "function_call",
            "status": status, "name": name, "call_id": call_id, "arguments": arguments}


def _text_field(item: dict[str, Any], key: str, limit: int = 0) -> str:
    value = item.get(key)
    if not isinstance(value, str) or (limit and not 1 <= len(value) <= limit):
        size = f" of 1 to {limit} characters" if limit else ""
        raise InvalidRequest(f"A {item.get('type')} item needs a string {key!r}{size}.",
                             param=f"item.{key}")
    return value


class Conversation:
    """Items in order, by id."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []

    def get(self, item_id: Any, param: str = "item_id") -> dict[str, Any]:
        for item in self.items:
            if item["id"] == item_id:
                return item
        raise InvalidRequest(f"No conversation item has id {item_id!r}.", param=param,
                             details={"realtime_code": "item_not_found"})

    def last_id(self) -> Optional[str]:
        return self.items[-1]["id"] if self.items else None

    def add(self, item: dict[str, Any], previous_item_id: Optional[str] = None) -> Optional[str]:
        """Insert after ``previous_item_id`` ("root": first; None: last); returns the id
        of the item before it."""
        if len(self.items) >= MAX_ITEMS:
            raise InvalidRequest(f"The conversation holds {MAX_ITEMS} items, the most allowed; "
                                 "delete some with conversation.item.delete.", param="item")
        if any(i["id"] == item["id"] for i in self.items):
            raise InvalidRequest(f"An item with id {item['id']!r} already exists.", param="item.id")
        if previous_item_id is None:
            before = self.last_id()
            self.items.append(item)
            return before
        if previous_item_id == "root":
            self.items.insert(0, item)
            return None
        index = self.items.index(self.get(previous_item_id, "previous_item_id"))
        self.items.insert(index + 1, item)
        return previous_item_id

    def delete(self, item_id: Any) -> None:
        self.items.remove(self.get(item_id))

    @staticmethod
    def check_item(item: Any) -> dict[str, Any]:
        """A client's ``conversation.item.create`` item -> a stored item (or a clear error)."""
        if not isinstance(item, dict):
            raise InvalidRequest("item must be an object, e.g. {\"type\": \"message\", \"role\": "
                                 "\"user\", \"content\": [{\"type\": \"input_text\", \"text\": \"Hi\"}]}",
                                 param="item")
        kind = item.get("type", "message")
        item_id = item.get("id")
        if item_id is not None and (not isinstance(item_id, str) or not 1 <= len(item_id) <= 64):
            raise InvalidRequest("item.id must be a string of 1 to 64 characters.", param="item.id")
        if kind == "function_call_output":
            return {"id": item_id or new_id("item"), "object": "realtime.item",
                    "type": "function_call_output", "status": "completed",
                    "call_id": _text_field(item, "call_id", 256), "output": _text_field(item, "output")}
        if kind == "function_call":
            return function_call_item(_text_field(item, "call_id", 256), _text_field(item, "name", 64),
                                      _text_field(item, "arguments"), "completed", item_id)
        if kind != "message":
            raise InvalidRequest(f"item.type {kind!r} is not supported: send a message, "
                                 "function_call or function_call_output item.", param="item.type")
        return Conversation._check_message(item, item_id)

    @staticmethod
    def _check_message(item: dict[str, Any], item_id: Optional[str]) -> dict[str, Any]:
        role = item.get("role")
        if role not in _ROLE_PARTS:
            raise InvalidRequest("item.role must be user, assistant or system.", param="item.role")
        content = item.get("content")
        if not isinstance(content, list) or not content:
            raise InvalidRequest("item.content must be a non-empty list of parts.", param="item.content")
        parts = []
        for n, part in enumerate(content):
            ptype = part.get("type") if isinstance(part, dict) else None
            if ptype not in _ROLE_PARTS[role]:
                raise InvalidRequest(
                    f"item.content[{n}].type {ptype!r} is not valid for role {role!r}: use one of "
                    f"{', '.join(sorted(_ROLE_PARTS[role]))}.", param=f"item.content[{n}].type")
            key = _TEXT_KEYS[ptype]
            text = part.get(key)
            if ptype != "input_audio" and not isinstance(text, str):
                raise InvalidRequest(f"item.content[{n}] needs a string {key!r}.",
                                     param=f"item.content[{n}].{key}")
            parts.append({k: v for k, v in part.items() if k != "audio"})
        return message_item(role, parts, "completed", item_id)

    def messages(self, instructions: str) -> list[ChatMessage]:
        """The conversation as chat messages for the text model."""
        out = [ChatMessage("system", instructions)] if instructions else []
        for item in self.items:
            if item["type"] == "function_call":
                call = ToolCall(item["call_id"], item["name"], item["arguments"])
                last = out[-1] if out else None
                if last is not None and last.role == "assistant":  # calls of one turn
                    last.tool_calls = (*last.tool_calls, call)
                else:
                    out.append(ChatMessage("assistant", "", tool_calls=(call,)))
                continue
            if item["type"] == "function_call_output":
                out.append(ChatMessage("tool", item["output"], tool_call_id=item["call_id"]))
                continue
            text = " ".join(
                (part.get(_TEXT_KEYS.get(part.get("type", ""), "text")) or "").strip()
                for part in item["content"]).strip()
            if text:
                out.append(ChatMessage(item["role"], text))
        return out

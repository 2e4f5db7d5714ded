"""What the provider fakes answer to agent requests: one deterministic rule set, read from
each provider's wire format by the fakes (``tests/fake_openai.py``,
``tests/fake_providers.py``) and answered in that format.

The rules, in order:

1. the last turn is a tool result (``tool`` message, ``tool_result`` block,
   ``functionResponse`` part): the text ``Tool said: <result>``;
2. the request has tools and either forces one (``required``/``any``/named, Gemini
   ``ANY``) or its last user text contains the word ``tool``: a call of the forced tool
   (else the first), its arguments :func:`example_for` the tool's parameter schema
   (``"Paris"`` for a string, 1 for an integer, ...);
3. a JSON response format: :func:`example_for` its schema (``{"answer": "ok"}`` for
   ``json_object``), as text;
4. images in the last user turn: ``Saw N image(s): <media types>``;
5. otherwise the fake's usual words (:func:`tests.fake_openai.reply_tokens`).

A tool call is reported as :data:`TOOL_CALL_TOKENS` completion tokens.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Optional

__all__ = ["AgentAnswer", "example_for", "TOOL_CALL_TOKENS", "decide", "words",
           "read_openai", "read_anthropic", "read_gemini"]

TOOL_CALL_TOKENS = 3


@dataclass
class AgentAnswer:
    """A text answer (``text``) or one tool call (``tool`` with ``args``)."""

    text: Optional[str] = None
    tool: Optional[str] = None
    args: Optional[dict[str, Any]] = None

    @property
    def arguments(self) -> str:
        return json.dumps(self.args or {})


def example_for(schema: Any) -> Any:
    """A small instance of a JSON schema (the first enum value, else one per type)."""
    if not isinstance(schema, dict):
        return "Paris"
    if schema.get("enum"):
        return schema["enum"][0]
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if kind == "object":
        return {name: example_for(sub) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [example_for(schema.get("items"))]
    return {"integer": 1, "number": 1.5, "boolean": True, "null": None}.get(kind, "Paris")


def words(text: str) -> list[str]:
    """``text`` as the fakes' tokens (words, all but the first with a leading space)."""
    return [w if i == 0 else " " + w for i, w in enumerate(text.split(" "))]


def decide(*, tool_result: Optional[str], tools: dict[str, Any], forced: Optional[str],
           last_user: str, schema: Any, json_mode: bool,
           images: list[str]) -> Optional[AgentAnswer]:
    """The answer under the module's rules (None: rule 5, the usual words).

    ``tools`` maps names to parameter schemas in the order declared; ``forced`` is the
    forced tool's name ("" when any tool must be called)."""
    if tool_result is not None:
        return AgentAnswer(text=f"Tool said: {tool_result}")
    if tools and (forced is not None or re.search(r"\btool\b", last_user, re.I)):
        name = forced or next(iter(tools))
        return AgentAnswer(tool=name, args=example_for(tools.get(name)))
    if json_mode:
        value = example_for(schema) if schema is not None else {"answer": "ok"}
        return AgentAnswer(text=json.dumps(value))
    if images:
        return AgentAnswer(text=f"Saw {len(images)} image(s): {', '.join(images)}")
    return None


def _media(url: str) -> str:
    return url[5:].split(";")[0] if url.startswith("data:") else "url"


def read_openai(body: dict[str, Any]) -> Optional[AgentAnswer]:
    """The answer to a chat completions body."""
    messages = body.get("messages") or []
    last = messages[-1] if messages else {}
    tools = {t["function"]["name"]: t["function"].get("parameters")
             for t in body.get("tools") or ()}
    choice = body.get("tool_choice", "auto")
    forced = "" if choice == "required" else (
        choice["function"]["name"] if isinstance(choice, dict) else None)
    if choice == "none":
        tools = {}
    user = next((m for m in reversed(messages) if m.get("role") == "user"), {})
    content = user.get("content")
    parts = content if isinstance(content, list) else []
    text = content if isinstance(content, str) else " ".join(
        p.get("text", "") for p in parts if p.get("type") == "text")
    rf = body.get("response_format") or {}
    return decide(
        tool_result=last.get("content") if last.get("role") == "tool" else None,
        tools=tools, forced=forced, last_user=text,
        schema=(rf.get("json_schema") or {}).get("schema"),
        json_mode=rf.get("type") in ("json_object", "json_schema"),
        images=[_media(p["image_url"]["url"]) for p in parts if p.get("type") == "image_url"])


def read_anthropic(body: dict[str, Any]) -> Optional[AgentAnswer]:
    """The answer to a Messages body (the forced structured-output tool is rule 2)."""
    messages = body.get("messages") or []
    content = messages[-1].get("content") if messages else ""
    blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
    results = [b for b in blocks if b.get("type") == "tool_result"]
    tools = {t["name"]: t.get("input_schema") for t in body.get("tools") or ()}
    choice = body.get("tool_choice") or {"type": "auto"}
    forced = {"any": "", "tool": choice.get("name")}.get(choice.get("type"))
    if choice.get("type") == "none":
        tools = {}
    return decide(
        tool_result=str(results[-1].get("content")) if results else None,
        tools=tools, forced=forced,
        last_user=" ".join(b.get("text", "") for b in blocks if b.get("type") == "text"),
        schema=None, json_mode=False,
        images=[b["source"].get("media_type", "url") for b in blocks if b.get("type") == "image"])


def read_gemini(body: dict[str, Any]) -> Optional[AgentAnswer]:
    """The answer to a generateContent body."""
    contents = body.get("contents") or []
    parts = contents[-1].get("parts") or [] if contents else []
    results = [p["functionResponse"] for p in parts if "functionResponse" in p]
    tools = {d["name"]: d.get("parametersJsonSchema") or d.get("parameters")
             for t in body.get("tools") or () for d in t.get("functionDeclarations") or ()}
    calling = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
    allowed = calling.get("allowedFunctionNames") or [""]
    forced = allowed[0] if calling.get("mode") == "ANY" else None
    if calling.get("mode") == "NONE":
        tools = {}
    config = body.get("generationConfig") or {}
    return decide(
        tool_result=json.dumps(results[-1].get("response")) if results else None,
        tools=tools, forced=forced,
        last_user=" ".join(p.get("text", "") for p in parts if "text" in p),
        schema=config.get("responseJsonSchema") or config.get("responseSchema"),
        json_mode=config.get("responseMimeType") == "application/json",
        images=[p["inlineData"].get("mimeType", "") for p in parts if "inlineData" in p])

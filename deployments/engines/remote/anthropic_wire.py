"""Anthropic Messages wire format <-> the internal vocabulary.

Request: ``system``/``developer`` turns join into the top-level ``system``; a turn with
parts becomes ``text`` and ``image`` blocks (a data URL as a ``base64`` source, an http(s)
URL as a ``url`` source); an assistant turn's tool calls become ``tool_use`` blocks (the
client's ids kept, arguments parsed to the ``input`` object) and a ``tool`` turn becomes
a ``tool_result`` block in a user turn; consecutive turns of one role are merged (tool
results of one step go back together, as Anthropic asks). ``tools`` become
``{name, description, input_schema}``; ``tool_choice`` ``auto``/``required``/named/
``none`` becomes ``auto``/``any``/``tool``/``none``, with ``disable_parallel_tool_use``
when ``parallel_tool_calls`` is false.

Prompt caching: a turn's ``cache_control`` (what a Messages caller marked) goes back on
the last block of that turn (the system text then goes as text blocks).

Structured output is a forced tool: ``json_schema`` (or ``json_object``, schema
``{"type":"object"}``) sends one tool named :data:`JSON_TOOL` whose ``input_schema`` is
the schema and forces it; the tool's input is the JSON answer, returned as text with
finish ``stop``. This works on every Claude model and API version (the native
``output_format`` is a beta behind a header), so a schema's root must be an object.
"""

from __future__ import annotations

from typing import Any

from deployments.engines.remote.wire_util import arguments_object, split_data_url, system_text
from serve_app.protocol.internal import ChatMessage, GenerationRequest, ImagePart, NamedTool

__all__ = ["JSON_TOOL", "build_messages_body", "anthropic_usage", "json_mode"]

#: The forced tool that carries a structured answer (a name no client tool is likely to use).
JSON_TOOL = "troupe_structured_output"


def json_mode(request: GenerationRequest) -> bool:
    """Whether the answer is structured output through :data:`JSON_TOOL`."""
    rf = request.response_format
    return rf is not None and rf.type in ("json_object", "json_schema")


def _blocks(m: ChatMessage) -> list[dict[str, Any]]:
    """The content blocks of one non-system turn."""
    if m.role == "tool":
        return [{"type": "tool_result", "tool_use_id": m.tool_call_id or "",
                 "content": m.content}]
    blocks: list[dict[str, Any]] = []
    if m.parts:
        blocks.extend(_part(p) for p in m.parts)
    elif m.content:
        blocks.append({"type": "text", "text": m.content})
    for call in m.tool_calls:
        blocks.append({"type": "tool_use", "id": call.id, "name": call.name,
                       "input": arguments_object(call.arguments)})
    return blocks


def _part(part: Any) -> dict[str, Any]:
    if isinstance(part, ImagePart):
        data = split_data_url(part.url)
        if data is None:
            return {"type": "image", "source": {"type": "url", "url": part.url}}
        return {"type": "image", "source": {"type": "base64", "media_type": data.mime,
                                            "data": data.data}}
    return {"type": "text", "text": part.text}


def _messages(request: GenerationRequest) -> list[dict[str, Any]]:
    if request.messages is None:
        return [{"role": "user", "content": request.prompt or ""}]
    out: list[dict[str, Any]] = []
    for m in request.messages:
        if m.role in ("system", "developer"):
            continue
        role = "assistant" if m.role == "assistant" else "user"
        plain = not (m.parts or m.tool_calls or m.role == "tool" or m.cache_control)
        if out and out[-1]["role"] == role:
            last = out[-1]
            if isinstance(last["content"], str):
                last["content"] = [{"type": "text", "text": last["content"]}]
            last["content"].extend(_blocks(m))
        elif plain:
            out.append({"role": role, "content": m.content})
        else:
            out.append({"role": role, "content": _blocks(m)})
        if m.cache_control and isinstance(out[-1]["content"], list) and out[-1]["content"]:
            out[-1]["content"][-1]["cache_control"] = m.cache_control
    return out


def _system(request: GenerationRequest) -> Any:
    """The top-level ``system``: one string, or text blocks when a turn marks a cache
    breakpoint (the caller's ``cache_control`` kept on its block)."""
    turns = [m for m in request.messages or () if m.role in ("system", "developer")]
    if not any(m.cache_control for m in turns):
        return system_text(request)
    blocks: list[dict[str, Any]] = []
    for m in turns:
        block: dict[str, Any] = {"type": "text", "text": m.content}
        if m.cache_control:
            block["cache_control"] = m.cache_control
        blocks.append(block)
    return blocks


def build_messages_body(
    model: str, request: GenerationRequest, default_max_tokens: int, stream: bool = True
) -> dict[str, Any]:
    """The Messages API body for ``request``."""
    sp = request.sampling
    max_tokens = sp.max_tokens or sp.default_max_tokens or default_max_tokens
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": _messages(request),
        "temperature": min(1.0, max(0.0, sp.temperature)),
        "stream": stream,
    }
    system = _system(request)
    if system:
        body["system"] = system
    if sp.top_p != 1.0:
        body["top_p"] = sp.top_p
    if sp.stop:
        body["stop_sequences"] = list(sp.stop)
    if request.service_tier is not None:
        body["service_tier"] = request.service_tier
    _tools(request, body)
    return body


def _tools(request: GenerationRequest, body: dict[str, Any]) -> None:
    """Tools and tool choice, or the forced structured-output tool."""
    if json_mode(request):
        rf = request.response_format
        assert rf is not None
        schema = rf.schema if rf.type == "json_schema" else {"type": "object"}
        body["tools"] = [{"name": JSON_TOOL, "description": "Answer with this tool: its "
                          "input is the answer.", "input_schema": schema}]
        body["tool_choice"] = {"type": "tool", "name": JSON_TOOL}
        return
    if not request.tools:
        return
    body["tools"] = [_tool(t) for t in request.tools]
    choice = request.tool_choice
    if isinstance(choice, NamedTool):
        wire: dict[str, Any] = {"type": "tool", "name": choice.name}
    else:
        wire = {"type": {"auto": "auto", "required": "any", "none": "none"}[choice]}
    if not request.parallel_tool_calls and wire["type"] != "none":
        wire["disable_parallel_tool_use"] = True
    body["tool_choice"] = wire


def _tool(tool: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": tool.name, "input_schema": tool.parameters}
    if tool.description:
        out["description"] = tool.description
    return out


def anthropic_usage(usage: dict[str, Any]) -> int:
    """Prompt tokens of an Anthropic usage object (uncached + cache writes + cache reads)."""
    return sum(int(usage.get(k) or 0) for k in (
        "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"))

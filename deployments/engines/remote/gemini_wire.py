"""Gemini ``generateContent`` wire format <-> the internal vocabulary.

Request: ``system``/``developer`` turns become ``systemInstruction``; ``assistant`` turns
role ``model``, the others ``user``. Parts: text as ``text``, a data-URL image as
``inlineData`` (``mimeType``, ``data``), an http(s) image as ``fileData`` (``fileUri``);
an assistant tool call as ``functionCall`` (``name``, ``args``; ids stay on our side); a ``tool``
turn as ``functionResponse`` (``name`` looked up from the conversation's calls by
``tool_call_id``, since Gemini matches responses by name; ``response`` is the tool's
JSON object, or ``{"result": text}``), consecutive tool turns in one ``user`` content.
``tools`` become one ``functionDeclarations`` list with ``parametersJsonSchema`` (the
client's JSON Schema as is); ``tool_choice`` becomes ``toolConfig.functionCallingConfig``
``AUTO``/``ANY``/``NONE`` (a named tool: ``ANY`` with ``allowedFunctionNames``).
``response_format`` sets ``responseMimeType: application/json`` (plus
``responseJsonSchema`` for a schema); ``logprobs`` sets ``responseLogprobs`` and
``logprobs``; penalties become ``presencePenalty``/``frequencyPenalty``.

Answer: a ``functionCall`` part is a whole :class:`ToolCallDelta` (Gemini streams calls
whole); its id is the part's ``id`` when Gemini sends one, else a stable id from the
request id and the call's index (:func:`~.wire_util.synth_call_id`). ``logprobsResult``
``chosenCandidates``/``topCandidates`` become :class:`TokenLogprob` s.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from deployments.engines.remote.wire_util import (
    arguments_object,
    call_names,
    split_data_url,
    system_text,
)
from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import (
    ChatMessage,
    GenerationRequest,
    ImagePart,
    NamedTool,
    TokenLogprob,
)

__all__ = ["build_generate_body", "gemini_logprobs"]


def _part(part: Any) -> dict[str, Any]:
    if isinstance(part, ImagePart):
        data = split_data_url(part.url)
        if data is None:
            return {"fileData": {"fileUri": part.url}}
        return {"inlineData": {"mimeType": data.mime, "data": data.data}}
    return {"text": part.text}


def _tool_response(m: ChatMessage, names: dict[str, str]) -> dict[str, Any]:
    name = names.get(m.tool_call_id or "") or m.name
    if not name:
        raise InvalidRequest(
            f"A tool result answers call id {m.tool_call_id!r}, which no earlier assistant "
            "turn made; Gemini matches tool results by function name, so the call must be "
            "in the conversation.", param="messages")
    try:
        value = json.loads(m.content)
    except ValueError:
        value = None
    response = value if isinstance(value, dict) else {"result": m.content}
    return {"functionResponse": {"name": name, "response": response}}


def _parts(m: ChatMessage, names: dict[str, str]) -> list[dict[str, Any]]:
    if m.role == "tool":
        return [_tool_response(m, names)]
    parts: list[dict[str, Any]] = [_part(p) for p in m.parts] if m.parts else (
        [{"text": m.content}] if m.content or not m.tool_calls else [])
    for call in m.tool_calls:
        parts.append({"functionCall": {"name": call.name,
                                       "args": arguments_object(call.arguments)}})
    return parts


def _contents(request: GenerationRequest) -> list[dict[str, Any]]:
    if request.messages is None:
        return [{"role": "user", "parts": [{"text": request.prompt or ""}]}]
    names = call_names(request.messages)
    contents: list[dict[str, Any]] = []
    previous_tool = False
    for m in request.messages:
        if m.role in ("system", "developer"):
            continue
        parts = _parts(m, names)
        if m.role == "tool" and previous_tool:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": "model" if m.role == "assistant" else "user",
                             "parts": parts})
        previous_tool = m.role == "tool"
    return contents


def build_generate_body(request: GenerationRequest, context_length: int) -> dict[str, Any]:
    """The generateContent body for ``request``."""
    sp = request.sampling
    config: dict[str, Any] = {"temperature": sp.temperature, "topP": sp.top_p}
    if sp.max_tokens is not None or sp.default_max_tokens is not None:
        config["maxOutputTokens"] = sp.output_limit(context_length)
    if sp.stop:
        config["stopSequences"] = list(sp.stop)
    if sp.seed is not None:
        config["seed"] = sp.seed
    if sp.presence_penalty:
        config["presencePenalty"] = sp.presence_penalty
    if sp.frequency_penalty:
        config["frequencyPenalty"] = sp.frequency_penalty
    if sp.logprobs is not None:
        config["responseLogprobs"] = True
        if sp.logprobs:
            config["logprobs"] = sp.logprobs
    rf = request.response_format
    if rf is not None and rf.type in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        if rf.type == "json_schema":
            config["responseJsonSchema"] = rf.schema
    body: dict[str, Any] = {"contents": _contents(request), "generationConfig": config}
    system = system_text(request)
    if system:
        body["systemInstruction"] = {"parts": [{"text": system}]}
    if request.tools:
        body["tools"] = [{"functionDeclarations": [_declaration(t) for t in request.tools]}]
        body["toolConfig"] = {"functionCallingConfig": _calling(request.tool_choice)}
    return body


def _declaration(tool: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"name": tool.name, "parametersJsonSchema": tool.parameters}
    if tool.description:
        out["description"] = tool.description
    return out


def _calling(choice: Any) -> dict[str, Any]:
    if isinstance(choice, NamedTool):
        return {"mode": "ANY", "allowedFunctionNames": [choice.name]}
    return {"mode": {"auto": "AUTO", "required": "ANY", "none": "NONE"}[choice]}


def gemini_logprobs(candidate: dict[str, Any]) -> Optional[list[TokenLogprob]]:
    """A candidate's ``logprobsResult`` as internal logprobs (None when absent)."""
    result = candidate.get("logprobsResult")
    if not isinstance(result, dict):
        return None
    chosen = result.get("chosenCandidates") or []
    tops = result.get("topCandidates") or []
    out = []
    for i, entry in enumerate(chosen):
        top = tops[i].get("candidates") or [] if i < len(tops) else []
        out.append(TokenLogprob(
            entry.get("token", ""), -1, float(entry.get("logProbability", 0.0)),
            tuple((t.get("token", ""), -1, float(t.get("logProbability", 0.0))) for t in top)))
    return out

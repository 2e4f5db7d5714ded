"""OpenAI chat completions wire format <-> the internal vocabulary (OpenAI and Azure).

Request: turns keep their roles; a turn with parts sends ``content`` as ``text`` and
``image_url`` parts (``detail`` kept); an assistant turn's ``tool_calls`` and a ``tool``
turn's ``tool_call_id`` go out unchanged (ids are the client's). ``tools`` are
``{"type":"function","function":{name, description, parameters, strict}}``;
``tool_choice`` is ``auto``/``none``/``required`` or ``{"type":"function",...}``;
``parallel_tool_calls`` is sent when false (true is the provider's default). ``response_format`` is ``json_object`` or
``json_schema`` (``name``, ``schema``, ``strict``). ``logprobs``/``top_logprobs``,
``presence_penalty``, ``frequency_penalty`` and ``logit_bias`` are sent when set.

Answer: ``delta.tool_calls`` fragments (or a whole ``message.tool_calls``) become
:class:`ToolCallDelta` s, ``logprobs.content`` becomes :class:`TokenLogprob` s (token id
-1: the provider's tokenizer is not ours), and usage reads
``prompt_tokens_details.cached_tokens`` and ``completion_tokens_details.reasoning_tokens``.
"""

from __future__ import annotations

from typing import Any, Optional

from deployments.engines.remote.stream import StreamState
from serve_app.protocol.internal import (
    ChatMessage,
    GenerationRequest,
    ImagePart,
    NamedTool,
    TokenLogprob,
    ToolCallDelta,
)

__all__ = ["build_chat_body", "openai_message", "tool_call_deltas", "token_logprobs",
           "read_usage"]


def openai_message(m: ChatMessage) -> dict[str, Any]:
    """One internal turn as an OpenAI chat message."""
    out: dict[str, Any] = {"role": m.role}
    if m.parts:
        out["content"] = [_part(p) for p in m.parts]
    else:
        out["content"] = m.content
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function",
             "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        if not m.content and not m.parts:
            out["content"] = None
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name:
        out["name"] = m.name
    return out


def _part(part: Any) -> dict[str, Any]:
    if isinstance(part, ImagePart):
        image: dict[str, Any] = {"url": part.url}
        if part.detail:
            image["detail"] = part.detail
        return {"type": "image_url", "image_url": image}
    return {"type": "text", "text": part.text}


def build_chat_body(model: str, request: GenerationRequest, context_length: int) -> dict[str, Any]:
    """The upstream JSON body for ``request`` (always streaming, with usage)."""
    if request.messages is not None:
        messages = [openai_message(m) for m in request.messages]
    else:
        messages = [{"role": "user", "content": request.prompt or ""}]
    sp = request.sampling
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": sp.temperature,
        "top_p": sp.top_p,
    }
    if sp.max_tokens is not None or sp.default_max_tokens is not None:
        # The provider counts the prompt itself; the whole context is the room we know of.
        body["max_tokens"] = sp.output_limit(context_length)
    if sp.seed is not None:
        body["seed"] = sp.seed
    if sp.stop:
        body["stop"] = list(sp.stop)
    if request.service_tier is not None:
        body["service_tier"] = request.service_tier
    _agent_fields(request, body)
    return body


def _agent_fields(request: GenerationRequest, body: dict[str, Any]) -> None:
    """Tools, response format, logprobs, penalties and logit bias."""
    if request.tools:
        body["tools"] = [{"type": "function", "function": _function(t)} for t in request.tools]
        choice = request.tool_choice
        body["tool_choice"] = ({"type": "function", "function": {"name": choice.name}}
                               if isinstance(choice, NamedTool) else choice)
        if not request.parallel_tool_calls:  # true is the default (and some models refuse it)
            body["parallel_tool_calls"] = False
    rf = request.response_format
    if rf is not None and rf.type == "json_object":
        body["response_format"] = {"type": "json_object"}
    elif rf is not None and rf.type == "json_schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": rf.name or "response", "schema": rf.schema, "strict": rf.strict}}
    sp = request.sampling
    if sp.logprobs is not None:
        body["logprobs"] = True
        if sp.logprobs:
            body["top_logprobs"] = sp.logprobs
    if sp.presence_penalty:
        body["presence_penalty"] = sp.presence_penalty
    if sp.frequency_penalty:
        body["frequency_penalty"] = sp.frequency_penalty
    if sp.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in sp.logit_bias.items()}


def _function(tool: Any) -> dict[str, Any]:
    function: dict[str, Any] = {"name": tool.name, "parameters": tool.parameters}
    if tool.description:
        function["description"] = tool.description
    if tool.strict:
        function["strict"] = True
    return function


def tool_call_deltas(raw: Any) -> Optional[list[ToolCallDelta]]:
    """``delta.tool_calls`` (or ``message.tool_calls``) as internal fragments."""
    if not isinstance(raw, list) or not raw:
        return None
    deltas = []
    for position, call in enumerate(raw):
        function = call.get("function") or {}
        deltas.append(ToolCallDelta(
            int(call.get("index", position)), call.get("id"), function.get("name"),
            function.get("arguments") or ""))
    return deltas


def token_logprobs(raw: Any) -> Optional[list[TokenLogprob]]:
    """``choice.logprobs.content`` as internal logprobs (None when absent)."""
    content = raw.get("content") if isinstance(raw, dict) else None
    if not isinstance(content, list):
        return None
    return [TokenLogprob(e.get("token", ""), -1, float(e.get("logprob", 0.0)), tuple(
        (t.get("token", ""), -1, float(t.get("logprob", 0.0)))
        for t in e.get("top_logprobs") or ())) for e in content]


def read_usage(usage: dict[str, Any], state: StreamState) -> None:
    """Prompt, completion, cached and reasoning tokens of an OpenAI usage object."""
    state.prompt_tokens = int(usage.get("prompt_tokens") or 0)
    if "completion_tokens" in usage:
        state.completion_tokens = int(usage.get("completion_tokens") or 0)
    prompt_details = usage.get("prompt_tokens_details") or {}
    state.cached_tokens = int(prompt_details.get("cached_tokens") or 0)
    completion_details = usage.get("completion_tokens_details") or {}
    state.reasoning_tokens = int(completion_details.get("reasoning_tokens") or 0)

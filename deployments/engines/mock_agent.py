"""What the mock engine says to agent requests: tool calls, JSON outputs and logprobs.

Deterministic, so routes are testable without a model:

* A tool call when ``tool_choice`` names a tool or is ``required`` (the tools named in the
  last user turn, else the first tool), or when it is ``auto`` and the last user turn names
  a tool; ``auto`` after a tool result answers in text, so agent loops end. Arguments are
  a minimal instance of the tool's schema (required properties, type-appropriate values),
  streamed in fragments as OpenAI streams them.
* With a ``json_schema`` response format, a minimal instance of the schema; with
  ``json_object``, ``{}``.
* Logprobs from the token's position and text.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Optional

from serve_app.protocol.internal import (
    EngineFinishReason,
    GenerationRequest,
    NamedTool,
    TokenLogprob,
    ToolCallDelta,
    ToolSpec,
)

__all__ = ["minimal_instance", "agent_plan", "token_logprob", "prompt_logprobs", "MOCK_VOCAB_SIZE", "FRAGMENT"]

#: Token ids the mock accepts (logit_bias keys and token-id prompts beyond it are refused).
MOCK_VOCAB_SIZE = 131_072
#: Characters per streamed fragment of tool arguments and JSON outputs.
FRAGMENT = 8


def _resolve(schema: dict, root: dict) -> dict:
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/"):
        node: Any = root
        for key in ref[2:].split("/"):
            node = node.get(key, {}) if isinstance(node, dict) else {}
        return _resolve(node, root)
    return schema


def minimal_instance(schema: Any, root: Optional[dict] = None) -> Any:
    """The smallest value valid for a (simple) JSON Schema: required properties only."""
    if not isinstance(schema, dict):
        return None
    root = schema if root is None else root
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("anyOf", "oneOf", "allOf"):
        if schema.get(key):
            return minimal_instance(schema[key][0], root)
    kind = schema.get("type", "object" if "properties" in schema else None)
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: minimal_instance(props.get(name, {}), root)
                for name in schema.get("required", [])}
    if kind == "array":
        count = schema.get("minItems", 0)
        return [minimal_instance(schema.get("items", {}), root) for _ in range(count)]
    if kind == "string":
        return "x" * schema.get("minLength", 0)
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", -1) + 1)
        return int(low) if kind == "integer" else float(low)
    if kind == "boolean":
        return False
    return None


def _fragments(text: str) -> list[str]:
    return [text[i:i + FRAGMENT] for i in range(0, len(text), FRAGMENT)] or [""]


def _last_user(request: GenerationRequest) -> str:
    if request.messages is None:
        return request.prompt or ""
    for message in reversed(request.messages):
        if message.role == "user":
            return message.content
    return ""


def _tools_to_call(request: GenerationRequest) -> list[ToolSpec]:
    tools, choice = request.tools, request.tool_choice
    if not tools or choice == "none":
        return []
    if isinstance(choice, NamedTool):
        return [t for t in tools if t.name == choice.name][:1]
    after_result = bool(request.messages) and request.messages[-1].role == "tool"  # type: ignore[index]  # bool() checked it is a non-empty list
    if choice == "auto" and after_result:
        return []
    said = _last_user(request)
    named = [t for t in tools if t.name in said]
    if not request.parallel_tool_calls:
        named = named[:1]
    if choice == "required":
        return named or [tools[0]]
    return named


def agent_plan(
    request: GenerationRequest,
) -> Optional[tuple[list[str], list[Optional[ToolCallDelta]], EngineFinishReason]]:
    """``(text per token, tool-call delta per token, finish)``, or None for plain text."""
    calls = _tools_to_call(request)
    if calls:
        texts: list[str] = []
        deltas: list[Optional[ToolCallDelta]] = []
        digest = hashlib.blake2b(request.request_id.encode(), digest_size=6).hexdigest()
        for index, tool in enumerate(calls):
            arguments = json.dumps(minimal_instance(tool.parameters))
            deltas.append(ToolCallDelta(index, f"call_{digest}{index}", tool.name, ""))
            deltas.extend(ToolCallDelta(index, arguments=f) for f in _fragments(arguments))
        texts = [""] * len(deltas)
        return texts, deltas, "tool_calls"
    fmt = request.response_format
    if fmt is not None and fmt.type != "text":
        value = minimal_instance(fmt.schema) if fmt.type == "json_schema" else {}
        pieces = _fragments(json.dumps(value))
        return pieces, [None] * len(pieces), "stop"
    return None


def _token_id(token: str) -> int:
    return int.from_bytes(hashlib.blake2b(token.encode(), digest_size=4).digest()) % MOCK_VOCAB_SIZE


def prompt_logprobs(prompt: str, k: int) -> list[TokenLogprob]:
    """The mock's prompt-token logprobs (``echo`` with logprobs): one per word."""
    words = prompt.split() or [""]
    return [token_logprob(1000 + i, w if i == 0 else " " + w, k) for i, w in enumerate(words)]


def token_logprob(position: int, token: str, k: int) -> TokenLogprob:
    """A deterministic logprob for ``token`` at ``position``, with ``k`` alternatives."""
    logprob = -((position * 37 + len(token)) % 50) / 25.0 - 0.01
    top = [(token, _token_id(token), logprob)]
    for j in range(1, k):
        alt = f"{token.strip() or '_'}~{j}"
        top.append((alt, _token_id(alt), logprob - j))
    return TokenLogprob(token, _token_id(token), logprob, tuple(top[:k]))

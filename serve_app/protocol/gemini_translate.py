"""A Gemini ``generateContent`` request in the internal vocabulary (the one translation).

* ``contents`` → :class:`ChatMessage` turns: ``text`` and ``inlineData`` images (as data
  URLs) or http(s) ``fileData`` images; a model turn's ``functionCall`` parts become its
  tool calls and a user turn's ``functionResponse`` parts ``tool`` turns. Gemini has no
  call ids: a call without one gets ``call_<turn>_<part>`` (stable, so the same history
  always yields the same ids) and a response is matched to the oldest unanswered call of
  that name (or to its own ``id``).
* ``systemInstruction`` → the system turn; ``tools.functionDeclarations`` → tool specs
  (Gemini's OpenAPI-style ``parameters`` Schema converted to JSON Schema, or
  ``parametersJsonSchema`` as is); ``toolConfig.functionCallingConfig`` → tool choice.
* ``generationConfig`` → sampling, ``n`` (``candidateCount``), logprobs and the response
  format (``responseMimeType: application/json`` with ``responseSchema`` or
  ``responseJsonSchema``).

Whatever Gemini defines that cannot take effect here is a 400 naming the field.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from pydantic.alias_generators import to_camel

from serve_app.errors import InvalidRequest
from serve_app.protocol.gemini import Content, GenerationConfig, Part, Tool, ToolConfig
from serve_app.protocol.internal import (
    ChatMessage,
    ContentPart,
    ImagePart,
    NamedTool,
    ResponseFormat,
    TextPart,
    ToolCall,
    ToolChoice,
    ToolSpec,
)
from serve_app.protocol.openai_tools import check_json_schema

__all__ = [
    "json_schema_of",
    "internal_messages",
    "tool_specs",
    "tool_choice_of",
    "response_format_of",
    "check_generation_config",
    "logprobs_of",
]

_SCHEMA_KEYS = frozenset({
    "type", "format", "title", "description", "nullable", "enum", "maxItems", "minItems",
    "properties", "required", "minProperties", "maxProperties", "minLength", "maxLength",
    "pattern", "example", "anyOf", "propertyOrdering", "default", "items", "minimum", "maximum",
})
_TYPES = frozenset({"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT", "NULL"})
_INT_KEYS = frozenset({"maxItems", "minItems", "minProperties", "maxProperties", "minLength",
                       "maxLength"})
#: Gemini-only ``format`` values (JSON Schema has no such formats; the type already says it).
_GEMINI_FORMATS = frozenset({"enum", "int32", "int64", "float", "double"})
#: Part fields that carry data (exactly one per part).
_DATA_FIELDS = ("text", "inline_data", "file_data", "function_call", "function_response",
                "executable_code", "code_execution_result")


def _bad(param: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"Invalid {param}: {message}", param=param)


def json_schema_of(schema: Any, where: str) -> dict[str, Any]:
    """Gemini's OpenAPI-subset ``Schema`` as JSON Schema (400 naming a bad key).

    An object with ``properties`` gets ``additionalProperties: false``: Gemini's Schema
    cannot allow other keys, and Gemini answers with the declared ones only.
    """
    if not isinstance(schema, dict):
        raise _bad(where, "a Schema must be an object")
    out: dict[str, Any] = {}
    for raw_key, value in schema.items():
        key = to_camel(raw_key) if "_" in raw_key else raw_key
        at = f"{where}.{key}"
        if key not in _SCHEMA_KEYS:
            raise _bad(at, f"{key!r} is not a field of Gemini's Schema")
        if key in ("propertyOrdering", "example", "nullable"):
            continue  # ordering and examples change no valid output; nullable is applied below
        if key == "type":
            kind = str(value).upper()
            if kind == "TYPE_UNSPECIFIED":
                continue
            if kind not in _TYPES:
                raise _bad(at, f"{value!r} is not a Schema type ({', '.join(sorted(_TYPES))})")
            out["type"] = kind.lower()
        elif key == "properties":
            if not isinstance(value, dict):
                raise _bad(at, "properties must be an object")
            out[key] = {name: json_schema_of(sub, f"{at}.{name}") for name, sub in value.items()}
        elif key == "items":
            out[key] = json_schema_of(value, at)
        elif key == "anyOf":
            if not isinstance(value, list):
                raise _bad(at, "anyOf must be a list of Schemas")
            out[key] = [json_schema_of(sub, f"{at}.{i}") for i, sub in enumerate(value)]
        elif key in _INT_KEYS:  # int64 fields arrive as strings in proto JSON
            try:
                out[key] = int(value)
            except (TypeError, ValueError):
                raise _bad(at, f"{value!r} is not an integer") from None
        elif key == "format" and value in _GEMINI_FORMATS:
            continue
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out:
        out["additionalProperties"] = False  # Gemini's Schema has no extra properties
    if schema.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def _checked_schema(schema: Any, where: str) -> dict[str, Any]:
    try:
        return check_json_schema(schema, where)
    except ValueError as exc:
        raise _bad(where, str(exc)) from None


def _data_field(part: Part, where: str) -> str:
    present = [f for f in _DATA_FIELDS if getattr(part, f) is not None]
    if len(present) != 1:
        raise _bad(where, "a part holds exactly one of text, inlineData, fileData, functionCall "
                          f"or functionResponse (this one has {len(present) or 'none'})")
    if present[0] in ("executable_code", "code_execution_result"):
        raise _bad(f"{where}.{to_camel(present[0])}", "code execution is not supported here")
    if part.video_metadata is not None:
        raise _bad(f"{where}.videoMetadata", "video input is not supported here")
    return present[0]


def _standard_b64(data: str) -> str:
    """Proto JSON bytes may be URL-safe and unpadded (google-genai sends them URL-safe)."""
    data = data.replace("-", "+").replace("_", "/")
    return data + "=" * (-len(data) % 4)


def _image(part: Part, where: str) -> ImagePart:
    if part.inline_data is not None:
        mime = part.inline_data.mime_type
        if not mime.startswith("image/"):
            raise _bad(f"{where}.inlineData.mimeType",
                       f"{mime!r} is not an image; only image/* inline data is served here")
        return ImagePart(f"data:{mime};base64,{_standard_b64(part.inline_data.data)}")
    data = part.file_data
    assert data is not None  # _data_field said so
    if not data.file_uri.startswith(("http://", "https://")) or not (
            data.mime_type or "image/").startswith("image/"):
        raise _bad(f"{where}.fileData", "only http(s) image URLs are served here (no Files API "
                                        "uploads); send the image as inlineData")
    return ImagePart(data.file_uri)


def _model_turn(content: Content, t: int) -> tuple[ChatMessage, list[ToolCall]]:
    texts, calls = [], []
    for k, part in enumerate(content.parts):
        where = f"contents.{t}.parts.{k}"
        if part.thought:
            continue  # the model's own thought summaries are not fed back, as on Gemini
        field = _data_field(part, where)
        if field == "text":
            texts.append(part.text or "")
        elif field == "function_call":
            call = part.function_call
            assert call is not None
            calls.append(ToolCall(call.id or f"call_{t}_{k}", call.name,
                                  json.dumps(call.args or {})))
        else:
            raise _bad(where, "a model turn holds only text and functionCall parts")
    return ChatMessage("assistant", "".join(texts), tool_calls=tuple(calls)), calls


def _result_text(response: dict[str, Any]) -> str:
    """A function's result as the model reads it: a lone string output, else the JSON."""
    if len(response) == 1:
        (value,) = response.values()
        if isinstance(value, str):
            return value
    return json.dumps(response)


def _user_turns(content: Content, t: int, pending: list[ToolCall]) -> list[ChatMessage]:
    out: list[ChatMessage] = []
    parts: list[ContentPart] = []
    for k, part in enumerate(content.parts):
        where = f"contents.{t}.parts.{k}"
        field = _data_field(part, where)
        if field == "function_response":
            answer = part.function_response
            assert answer is not None
            match = next((c for c in pending if (c.id == answer.id if answer.id
                                                 else c.name == answer.name)), None)
            if match is not None:
                pending.remove(match)
            call_id = match.id if match is not None else (answer.id or f"call_{t}_{k}")
            out.append(ChatMessage("tool", _result_text(answer.response), tool_call_id=call_id,
                                   name=answer.name))
        elif field == "function_call":
            raise _bad(where, "functionCall parts belong in a turn with role 'model'")
        elif field == "text":
            parts.append(TextPart(part.text or ""))
        else:
            parts.append(_image(part, where))
    if parts:
        text = "\n".join(p.text for p in parts if isinstance(p, TextPart))
        has_image = any(isinstance(p, ImagePart) for p in parts)
        out.append(ChatMessage("user", text, tuple(parts) if has_image else ()))
    return out


def internal_messages(system: Optional[Content], contents: list[Content]) -> list[ChatMessage]:
    """``systemInstruction`` and ``contents`` as internal turns (400 naming a bad part)."""
    out: list[ChatMessage] = []
    if system is not None:
        for k, part in enumerate(system.parts):
            if _data_field(part, f"systemInstruction.parts.{k}") != "text":
                raise _bad(f"systemInstruction.parts.{k}", "a system instruction is text only")
        out.append(ChatMessage("system", "\n".join(p.text or "" for p in system.parts)))
    pending: list[ToolCall] = []
    for t, content in enumerate(contents):
        if not content.parts:
            raise _bad(f"contents.{t}.parts", "a turn needs at least one part")
        if content.role == "model":
            turn, pending = _model_turn(content, t)
            out.append(turn)
        else:
            out.extend(_user_turns(content, t, pending))
    return out


def tool_specs(tools: Optional[list[Tool]]) -> tuple[ToolSpec, ...]:
    """``functionDeclarations`` as tool specs; any other kind of tool is a 400 naming it."""
    specs: list[ToolSpec] = []
    for i, tool in enumerate(tools or ()):
        for name, value in tool:
            if name != "function_declarations" and value is not None:
                raise _bad(f"tools.{i}.{to_camel(name)}", "only functionDeclarations tools are "
                                                          "served here (no built-in tools)")
        for j, decl in enumerate(tool.function_declarations or ()):
            where = f"tools.{i}.functionDeclarations.{j}"
            if decl.behavior not in (None, "UNSPECIFIED", "BLOCKING"):
                raise _bad(f"{where}.behavior", "only BLOCKING functions are served here")
            if decl.parameters is not None and decl.parameters_json_schema is not None:
                raise _bad(where, "send parameters or parametersJsonSchema, not both")
            if decl.parameters_json_schema is not None:
                params = _checked_schema(decl.parameters_json_schema,
                                         f"{where}.parametersJsonSchema")
            elif decl.parameters is not None:
                params = _checked_schema(json_schema_of(decl.parameters, f"{where}.parameters"),
                                         f"{where}.parameters")
            else:
                params = {"type": "object", "properties": {}}
            specs.append(ToolSpec(decl.name, decl.description, params))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise _bad("tools", "function names must be unique")
    return tuple(specs)


def tool_choice_of(
    config: Optional[ToolConfig], specs: tuple[ToolSpec, ...]
) -> tuple[ToolChoice, tuple[ToolSpec, ...]]:
    """The tool choice, and the tools the model may call (``allowedFunctionNames``)."""
    where = "toolConfig.functionCallingConfig"
    if config is not None and config.retrieval_config is not None:
        raise _bad("toolConfig.retrievalConfig", "retrieval tools are not served here")
    calling = config.function_calling_config if config is not None else None
    mode = (calling.mode if calling is not None else None) or "AUTO"
    allowed = calling.allowed_function_names if calling is not None else None
    if mode == "VALIDATED":
        raise _bad(f"{where}.mode", "VALIDATED is not supported here; use AUTO or ANY (ANY "
                                    "constrains the call to the declared schema)")
    if allowed is not None and mode != "ANY":
        raise _bad(f"{where}.allowedFunctionNames", "allowed function names need mode ANY")
    if mode == "NONE":
        return "none", specs
    if mode != "ANY":
        return "auto", specs
    if not specs:
        raise _bad(f"{where}.mode", "mode ANY needs at least one function declaration")
    if not allowed:
        return "required", specs
    unknown = sorted(set(allowed) - {s.name for s in specs})
    if unknown:
        raise _bad(f"{where}.allowedFunctionNames", f"{unknown} are not declared in tools")
    if len(allowed) == 1:
        return NamedTool(allowed[0]), specs
    return "required", tuple(s for s in specs if s.name in allowed)


def response_format_of(config: GenerationConfig) -> Optional[ResponseFormat]:
    """``responseMimeType`` (+ schema) as the internal response format."""
    mime = config.response_mime_type
    has_schema = config.response_schema is not None or config.response_json_schema is not None
    if mime in (None, "text/plain"):
        if has_schema:
            raise _bad("generationConfig.responseMimeType",
                       "a response schema needs responseMimeType 'application/json'")
        return None
    if mime != "application/json":
        raise _bad("generationConfig.responseMimeType",
                   f"{mime!r} is not served here; use 'text/plain' or 'application/json'")
    if config.response_schema is not None and config.response_json_schema is not None:
        raise _bad("generationConfig", "send responseSchema or responseJsonSchema, not both")
    if config.response_json_schema is not None:
        schema = _checked_schema(config.response_json_schema, "generationConfig.responseJsonSchema")
    elif config.response_schema is not None:
        schema = _checked_schema(json_schema_of(config.response_schema,
                                                "generationConfig.responseSchema"),
                                 "generationConfig.responseSchema")
    else:
        return ResponseFormat("json_object")
    return ResponseFormat("json_schema", schema, None, True)


_REFUSED = {
    "top_k": "no engine here exposes top-k sampling; omit it (topP and temperature work)",
    "speech_config": "text models here produce text only",
    "image_config": "text models here produce text only",
    "media_resolution": "images are read at the model's own resolution here",
    "audio_timestamp": "no audio input is served here",
    "routing_config": "Vertex AI's model routing does not apply; pick a Troupe model id",
    "model_selection_config": "Vertex AI's model routing does not apply; pick a Troupe model id",
}


def check_generation_config(config: GenerationConfig) -> None:
    """400 for a ``generationConfig`` field that cannot take effect here."""
    for name, why in _REFUSED.items():
        if getattr(config, name) is not None:
            raise _bad(f"generationConfig.{to_camel(name)}", why)
    if config.enable_enhanced_civic_answers:
        raise _bad("generationConfig.enableEnhancedCivicAnswers", "not available here")
    modalities = {m.upper() for m in config.response_modalities or ()}
    if modalities - {"TEXT"}:
        raise _bad("generationConfig.responseModalities", "text models here produce TEXT only")


def logprobs_of(config: GenerationConfig) -> Optional[int]:
    """The internal logprobs setting (None: none asked for)."""
    if config.logprobs is not None and not config.response_logprobs:
        raise _bad("generationConfig.logprobs", "logprobs needs responseLogprobs: true")
    if not config.response_logprobs:
        return None
    return config.logprobs or 0

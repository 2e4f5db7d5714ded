"""OpenAI's agent fields on the wire: tools, tool choice, response formats, content parts.

Pydantic models for what a chat request may say about tools, structured outputs and
images, plus the one translation of each into the internal vocabulary
(:mod:`serve_app.protocol.internal`) and back into OpenAI's response shapes. Every value is
checked here, so a bad one is a 400 naming its field; what cannot be checked without the
model (token ids in ``logit_bias``, whether a schema compiles) is the engine's to refuse.
"""

from __future__ import annotations

import functools
from typing import Any, Iterable, Literal, Optional, Union

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator

from serve_app.protocol.internal import (
    ImagePart,
    NamedTool,
    ResponseFormat,
    TextPart,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
)

__all__ = [
    "FUNCTION_NAME",
    "check_json_schema",
    "FunctionSpecIn",
    "FunctionDef",
    "ToolIn",
    "NamedChoiceIn",
    "ToolCallIn",
    "ContentPartIn",
    "JSONSchemaFormat",
    "ResponseFormatIn",
    "unique_tool_specs",
    "to_tool_specs",
    "to_tool_choice",
    "check_tool_choice",
    "to_response_format",
    "check_logit_bias",
    "tool_calls_out",
    "tool_call_deltas_out",
    "chat_logprobs_out",
    "completion_logprobs_out",
]

#: OpenAI's rule for function names.
FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


def check_json_schema(schema: Any, what: str) -> dict:
    """``schema`` when it is a valid JSON Schema object, else a ValueError saying why."""
    if not isinstance(schema, dict):
        raise ValueError(f"{what} must be a JSON Schema object, not {type(schema).__name__}")
    try:
        key = orjson.dumps(schema, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # not JSON (cannot come from a request body): check it uncached
        key = None
    problem = _schema_problem(key) if key is not None else _problem_of(schema)
    if problem is not None:
        raise ValueError(f"{what} {problem}")
    return schema


@functools.lru_cache(maxsize=1024)
def _schema_problem(key: bytes) -> Optional[str]:
    """What is wrong with the schema serialized as ``key`` (None: valid). Cached because
    agents send the same tools with every request and the metaschema check costs ms."""
    return _problem_of(orjson.loads(key))


def _problem_of(schema: dict) -> Optional[str]:
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        where = "/".join(str(p) for p in exc.path) or "(root)"
        return f"is not a valid JSON Schema at {where}: {exc.message}"
    return None


class FunctionSpecIn(_Lenient):
    """A function tool's definition (name, description, parameters schema, strict): chat's
    ``tools[].function`` and, with its ``type``, a Responses ``tools[]`` item."""

    name: str = Field(..., pattern=FUNCTION_NAME)
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None
    strict: Optional[bool] = None

    @field_validator("parameters")
    @classmethod
    def _schema(cls, value):
        if value is not None:
            check_json_schema(value, "parameters")
            if value.get("type", "object") != "object":
                raise ValueError("a function's parameters schema must have type 'object'")
        return value

    def spec(self) -> ToolSpec:
        params = self.parameters if self.parameters is not None else {
            "type": "object", "properties": {}}
        return ToolSpec(self.name, self.description, params, bool(self.strict))


#: Chat's name for it (``tools[].function``).
FunctionDef = FunctionSpecIn


class ToolIn(_Lenient):
    """``{"type": "function", "function": {...}}``; other tool types are refused."""

    type: Literal["function"]
    function: FunctionDef


class _NamedFunction(_Lenient):
    name: str = Field(..., pattern=FUNCTION_NAME)


class NamedChoiceIn(_Lenient):
    """``{"type": "function", "function": {"name": ...}}``: call exactly this tool."""

    type: Literal["function"]
    function: _NamedFunction


class _CalledFunction(_Lenient):
    name: str = Field(..., pattern=FUNCTION_NAME)
    arguments: str


class ToolCallIn(_Lenient):
    """A tool call in an assistant message the client sends back."""

    id: str = Field(..., min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: _CalledFunction

    def call(self) -> ToolCall:
        return ToolCall(self.id, self.function.name, self.function.arguments)


class _ImageURL(_Lenient):
    url: str = Field(..., min_length=1)
    detail: Optional[Literal["auto", "low", "high"]] = None


class ContentPartIn(_Lenient):
    """A content part: ``text`` or ``image_url`` (audio and files are refused)."""

    type: Literal["text", "image_url"]
    text: Optional[str] = None
    image_url: Optional[_ImageURL] = None

    def part(self) -> Union[TextPart, ImagePart]:
        if self.type == "text":
            if self.text is None:
                raise ValueError("a content part of type 'text' needs a 'text' field")
            return TextPart(self.text)
        if self.image_url is None:
            raise ValueError("a content part of type 'image_url' needs an 'image_url' object")
        return ImagePart(self.image_url.url, self.image_url.detail)


class JSONSchemaFormat(_Lenient):
    """``response_format.json_schema``."""

    name: str = Field(..., pattern=FUNCTION_NAME)
    description: Optional[str] = None
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    strict: Optional[bool] = None

    @field_validator("schema_")
    @classmethod
    def _schema(cls, value):
        return None if value is None else check_json_schema(value, "schema")


class ResponseFormatIn(_Lenient):
    """``response_format``: ``text``, ``json_object`` or ``json_schema``."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JSONSchemaFormat] = None


def unique_tool_specs(specs: Iterable[ToolSpec]) -> tuple[ToolSpec, ...]:
    """``specs`` as a tuple; two with one name are a ValueError (a call would be ambiguous)."""
    out = tuple(specs)
    names = [s.name for s in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"function names must be unique; repeated: {', '.join(dupes)}")
    return out


def to_tool_specs(tools: Optional[list[ToolIn]]) -> tuple[ToolSpec, ...]:
    """A chat request's tools (see :func:`unique_tool_specs`)."""
    return unique_tool_specs(t.function.spec() for t in tools or ())


def to_tool_choice(choice: Union[str, NamedChoiceIn, None]) -> ToolChoice:
    if choice is None:
        return "auto"
    if isinstance(choice, NamedChoiceIn):
        return NamedTool(choice.function.name)
    return choice  # type: ignore[return-value]


def check_tool_choice(choice: ToolChoice, tools: tuple[ToolSpec, ...]) -> Optional[str]:
    """Why ``choice`` cannot be honoured with ``tools`` (None when it can)."""
    if isinstance(choice, NamedTool):
        if not any(t.name == choice.name for t in tools):
            known = ", ".join(t.name for t in tools) or "(no tools given)"
            return f"tool_choice names {choice.name!r}, which is not in tools ({known})"
    elif choice == "required" and not tools:
        return "tool_choice 'required' needs at least one tool in 'tools'"
    return None


def to_response_format(fmt: Optional[ResponseFormatIn]) -> Optional[ResponseFormat]:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat("json_object")
    js = fmt.json_schema
    if js is None:
        raise ValueError("response_format of type 'json_schema' needs a 'json_schema' object")
    schema = js.schema_ if js.schema_ is not None else {"type": "object"}
    return ResponseFormat("json_schema", schema, js.name, bool(js.strict))


def check_logit_bias(bias: Optional[dict[str, float]]) -> dict[int, float]:
    """``logit_bias`` with integer keys; a non-integer key or a value out of range is a
    ValueError naming the keys (that each id is in the vocabulary is the engine's check)."""
    if not bias:
        return {}
    bad_keys = [k for k in bias if not k.lstrip("-").isdigit() or int(k) < 0]
    if bad_keys:
        raise ValueError(f"logit_bias keys must be token ids (integers >= 0); bad: {bad_keys[:10]}")
    bad_values = [k for k, v in bias.items() if not -100 <= v <= 100]
    if bad_values:
        raise ValueError(f"logit_bias values must be in [-100, 100]; out of range for keys "
                         f"{bad_values[:10]}")
    return {int(k): float(v) for k, v in bias.items()}


def tool_calls_out(deltas: Optional[list[ToolCallDelta]]) -> Optional[list[dict[str, Any]]]:
    """A unary message's ``tool_calls`` (the joined chunk carries one whole delta per call)."""
    if not deltas:
        return None
    return [{"id": d.id, "type": "function",
             "function": {"name": d.name, "arguments": d.arguments}} for d in deltas]


def tool_call_deltas_out(deltas: list[ToolCallDelta]) -> list[dict[str, Any]]:
    """A stream chunk's ``delta.tool_calls``: id, type and name only in a call's first delta."""
    out = []
    for d in deltas:
        item: dict[str, Any] = {"index": d.index}
        function: dict[str, Any] = {}
        if d.id is not None:
            item["id"] = d.id
            item["type"] = "function"
        if d.name is not None:
            function["name"] = d.name
        function["arguments"] = d.arguments
        item["function"] = function
        out.append(item)
    return out


def _top(entry: TokenLogprob, k: int) -> list[dict[str, Any]]:
    return [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, _id, lp in entry.top[:k]]


def chat_logprobs_out(entries: Optional[list[TokenLogprob]], top: int) -> Optional[dict[str, Any]]:
    """A chat choice's ``logprobs`` object (``content`` per token, ``refusal`` null)."""
    if entries is None:
        return None
    return {
        "content": [
            {"token": e.token, "logprob": e.logprob, "bytes": list(e.token.encode()),
             "top_logprobs": _top(e, top)}
            for e in entries
        ],
        "refusal": None,
    }


def completion_logprobs_out(
    entries: Optional[list[TokenLogprob]], top: int, offset: int,
    prompt: Optional[list[TokenLogprob]] = None,
) -> Optional[dict[str, Any]]:
    """A completion choice's legacy ``logprobs`` (tokens, token_logprobs, top_logprobs,
    text_offset counted from ``offset``). ``prompt`` (``echo`` with logprobs): the prompt
    tokens' entries go first, the very first with null logprob and alternatives, as
    OpenAI's API answers (nothing precedes it)."""
    if entries is None and prompt is None:
        return None
    whole = [*(prompt or ()), *(entries or ())]
    offsets = []
    for e in whole:
        offsets.append(offset)
        offset += len(e.token)
    logprobs: list[Optional[float]] = [e.logprob for e in whole]
    tops: list[Optional[dict[str, float]]] = [{t: lp for t, _id, lp in e.top[:top]} for e in whole]
    if prompt:
        logprobs[0] = tops[0] = None
    return {"tokens": [e.token for e in whole], "token_logprobs": logprobs,
            "top_logprobs": tops, "text_offset": offsets}

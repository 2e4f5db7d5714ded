"""The Realtime protocol's session configuration (GA shape), validated.

A session is kept as its wire dict; ``session.update`` deep-merges into a copy, and the
merged dict is validated here, so a bad update names the field (``session.audio...``)
and leaves the session as it was. Fields the protocol defines either take effect or are
refused with that field named; a few are accepted and ignored on purpose
(:data:`IGNORED_FIELDS`).

Function tools (``tools``, ``tool_choice``, ``parallel_tool_calls``) are the Responses API's
``{"type": "function", "name", "description", "parameters"}``; a response may bring its own
(``response.create``'s ``response.tools``), replacing the session's for that response.

Troupe extensions: ``audio.output.model`` picks the text-to-speech model (the protocol
has no field for it: OpenAI's realtime models speak themselves);
``audio.input.transcription.model`` picks the speech-to-text model, which always runs
(the text model needs the words).
"""

from __future__ import annotations

import copy
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from serve_app.protocol.internal import ToolChoice, ToolSpec
from serve_app.protocol.responses_tools import FunctionTool, NamedFunction, tool_choice_of, tool_specs
from serve_app.realtime.audio import AudioFormat, parse_format

__all__ = ["IGNORED_FIELDS", "ResponseOptions", "SessionConfig", "check_tools", "first_error", "merge",
           "tools_of"]

#: Session fields accepted and ignored on purpose (they change nothing here).
IGNORED_FIELDS = ("tracing", "truncation", "include", "prompt", "object", "id", "expires_at")

DEFAULT_INSTRUCTIONS = "You are a helpful voice assistant. Answer briefly, in one or two sentences."


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


def _format(value: Any, param: str) -> dict[str, Any]:
    try:
        return parse_format(value, param).as_dict()
    except ValueError as exc:
        raise ValueError(str(exc)) from None


class TurnDetection(_Open):
    """``server_vad``; ``semantic_vad`` is refused (no model here judges meaning)."""

    type: str = "server_vad"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=5000)
    silence_duration_ms: int = Field(500, ge=32, le=10000)
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: None = Field(None, description="not supported: must be null")

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        if value == "semantic_vad":  # said outright, never quietly run as server_vad
            raise ValueError('"semantic_vad" is not supported here (no model on this server judges '
                             'whether a turn is finished); use {"type": "server_vad"}, or null for '
                             "push-to-talk")
        if value != "server_vad":
            raise ValueError(f'{value!r} is not a turn detection type; use "server_vad" or null')
        return value


class Transcription(_Open):
    model: Optional[str] = None
    language: Optional[str] = None
    prompt: Optional[str] = None


class AudioInput(_Open):
    format: dict[str, Any] = Field(default_factory=lambda: {"type": "audio/pcm", "rate": 24000})
    transcription: Optional[Transcription] = None
    turn_detection: Optional[TurnDetection] = Field(default_factory=TurnDetection)
    noise_reduction: None = Field(None, description="not supported: must be null")

    @field_validator("format", mode="before")
    @classmethod
    def _fmt(cls, value: Any) -> dict[str, Any]:
        return _format(value, "format")


class AudioOutput(_Open):
    format: dict[str, Any] = Field(default_factory=lambda: {"type": "audio/pcm", "rate": 24000})
    voice: str = "alloy"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    model: Optional[str] = None  # Troupe: the text-to-speech model

    @field_validator("format", mode="before")
    @classmethod
    def _fmt(cls, value: Any) -> dict[str, Any]:
        return _format(value, "format")


class Audio(_Open):
    input: AudioInput = Field(default_factory=AudioInput)
    output: AudioOutput = Field(default_factory=AudioOutput)


Modalities = list[Literal["text", "audio"]]


def _audio_only() -> Modalities:
    return ["audio"]


def _one_modality(value: list[str]) -> list[str]:
    if sorted(set(value)) not in (["audio"], ["text"]):
        raise ValueError('must be ["audio"] (spoken answers with a transcript) or ["text"]')
    return value


class SessionConfig(_Open):
    """One realtime session's settings, as sent in ``session.created`` / ``updated``."""

    type: Literal["realtime"] = "realtime"
    model: str
    output_modalities: Modalities = Field(default_factory=_audio_only)
    instructions: str = DEFAULT_INSTRUCTIONS
    audio: Audio = Field(default_factory=Audio)
    max_output_tokens: Union[int, Literal["inf"]] = "inf"
    temperature: Optional[float] = Field(None, ge=0.0, le=2.0)
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Union[Literal["auto", "none", "required"], NamedFunction] = "auto"
    parallel_tool_calls: Optional[bool] = None

    @field_validator("output_modalities")
    @classmethod
    def _modalities(cls, value: list[str]) -> list[str]:
        return _one_modality(value)

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value: Any, info: ValidationInfo) -> Any:
        check_tools(info.data.get("tools", []), value)  # tools are validated first
        return value

    @field_validator("max_output_tokens")
    @classmethod
    def _max_tokens(cls, value: Union[int, str]) -> Union[int, str]:
        if isinstance(value, int) and not 1 <= value <= 4096:
            raise ValueError("must be 1 to 4096, or \"inf\"")
        return value

    @property
    def input_format(self) -> AudioFormat:
        return parse_format(self.audio.input.format, "audio.input.format")

    @property
    def output_format(self) -> AudioFormat:
        return parse_format(self.audio.output.format, "audio.output.format")

    def wire(self) -> dict[str, Any]:
        return {"object": "realtime.session", **self.model_dump(mode="json")}


class ResponseOptions(_Open):
    """``response.create``'s ``response`` object (all optional: the session's are used)."""

    output_modalities: Optional[Modalities] = None
    instructions: Optional[str] = None
    max_output_tokens: Optional[Union[int, Literal["inf"]]] = None
    conversation: Union[Literal["auto", "none"], str] = "auto"
    input: Optional[list[dict[str, Any]]] = None
    metadata: Optional[dict[str, str]] = None
    audio: Optional[dict[str, Any]] = None
    tools: Optional[list[FunctionTool]] = None
    tool_choice: Optional[Union[Literal["auto", "none", "required"], NamedFunction]] = None

    @field_validator("output_modalities")
    @classmethod
    def _modalities(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        return None if value is None else _one_modality(value)

    @field_validator("conversation")
    @classmethod
    def _conversation(cls, value: str) -> str:
        if value not in ("auto", "none"):
            raise ValueError('must be "auto" or "none"')
        return value


def check_tools(tools: list[FunctionTool], choice: Any) -> None:
    """Tool names are unique, and a named tool choice names one of them."""
    names = [t.name for t in tools]
    if len(set(names)) != len(names):
        raise ValueError("function names in tools must be unique")
    if isinstance(choice, NamedFunction) and choice.name not in names:
        raise ValueError(f"tool_choice names {choice.name!r}, which is not among the tools "
                         f"({', '.join(names) or 'none given'})")
    if choice == "required" and not tools:
        raise ValueError('tool_choice "required" needs at least one tool in tools')


def tools_of(config: SessionConfig, opts: ResponseOptions) -> tuple[tuple[ToolSpec, ...], ToolChoice]:
    """The tools and tool choice of one response: its own, else the session's.

    Raises:
        ValueError: a response's tool choice that does not fit the tools in effect.
    """
    tools = config.tools if opts.tools is None else opts.tools
    choice = config.tool_choice if opts.tool_choice is None else opts.tool_choice
    check_tools(tools, choice)
    return tool_specs(tools), tool_choice_of(choice)


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``update`` deep-merged into a copy of ``base`` (an explicit null replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def first_error(exc: ValidationError, prefix: str) -> tuple[str, str]:
    """(param, message) of a validation error's first problem."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in (prefix, *first["loc"]) if p != "")
    message = first["msg"].removeprefix("Value error, ")
    return where, f"{where}: {message}"

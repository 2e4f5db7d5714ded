"""OpenAI-compatible request models (chat completions, completions).

Requests accept unknown fields (clients send new ones); the gateway logs their names.
Only what Troupe acts on is typed; everything typed is validated strictly enough that a
bad value is a 400 naming the field, never a 500.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from serve_app.protocol.internal import MAX_TOP_LOGPROBS, ChatMessage
from serve_app.protocol.openai_tools import (
    ContentPartIn,
    NamedChoiceIn,
    ResponseFormatIn,
    ToolCallIn,
    ToolIn,
    check_logit_bias,
)

__all__ = [
    "ChatMessageIn",
    "StreamOptions",
    "ChatCompletionRequest",
    "CompletionRequest",
    "CHAT_EXAMPLE",
    "COMPLETION_EXAMPLE",
    "check_stop",
    "stop_tuple",
    "unknown_fields",
]

CHAT_EXAMPLE = (
    '{"model": "smollm2-135m", "messages": [{"role": "user", "content": "Hello"}], '
    '"max_tokens": 32}'
)
COMPLETION_EXAMPLE = '{"model": "smollm2-135m", "prompt": "Once upon a time", "max_tokens": 32}'


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessageIn(_Lenient):
    """One chat turn: text or typed parts; an assistant turn may carry tool calls, and a
    ``tool`` turn answers one by ``tool_call_id``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPartIn], None] = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallIn]] = None
    tool_call_id: Optional[str] = Field(None, min_length=1, max_length=256)

    def text(self) -> str:
        """Flatten the content to text (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or "" for p in self.content if p.type == "text")

    @field_validator("content")
    @classmethod
    def _parts_complete(cls, value):
        if isinstance(value, list):
            for part in value:
                part.part()  # a text part without text, an image part without a URL
        return value

    @model_validator(mode="after")
    def _role_rules(self) -> "ChatMessageIn":
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a 'tool' message needs 'tool_call_id' (the call it answers)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an 'assistant' message may carry 'tool_calls'")
        if isinstance(self.content, list) and self.role != "user" and any(
            p.type == "image_url" for p in self.content
        ):
            raise ValueError("image parts are accepted only in 'user' messages")
        return self

    def internal(self) -> ChatMessage:
        """This turn in the internal vocabulary."""
        parts = tuple(p.part() for p in self.content) if isinstance(self.content, list) else ()
        return ChatMessage(
            self.role, self.text(), parts,
            tuple(c.call() for c in self.tool_calls or ()), self.tool_call_id, self.name,
        )


class StreamOptions(_Lenient):
    include_usage: bool = False


_Stop = Union[str, list[str], None]


def stop_tuple(value: _Stop) -> tuple[str, ...]:
    """``stop`` as a tuple (it may be absent, one string, or a list)."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def check_stop(value: _Stop) -> _Stop:
    """At most 4 non-empty stop sequences (OpenAI's limit)."""
    if isinstance(value, list):
        if len(value) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(not s for s in value):
            raise ValueError("stop sequences must be non-empty strings")
    elif value == "":
        raise ValueError("stop must be a non-empty string")
    return value


class _SamplingFields(_Lenient):
    model: str = Field(..., min_length=1, max_length=256)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=128)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: _Stop = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    user: Optional[str] = None
    #: Deadline tier routing (serve_app.gateway.deadline): validated against the model there.
    start_within: Optional[str] = Field(None, max_length=32)
    service_tier: Optional[str] = Field(None, max_length=32)

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, value: _Stop) -> _Stop:
        return check_stop(value)

    def stop_tuple(self) -> tuple[str, ...]:
        return stop_tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class _AgentSampling(_SamplingFields):
    """Penalties and logit bias, shared by chat and completions."""

    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        check_logit_bias(value)
        return value


class ChatCompletionRequest(_AgentSampling):
    messages: list[ChatMessageIn] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    tools: Optional[list[ToolIn]] = Field(None, max_length=128)
    tool_choice: Union[Literal["auto", "none", "required"], NamedChoiceIn, None] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormatIn] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    #: Routes requests that share it to the replica holding their prefix (local models).
    prompt_cache_key: Optional[str] = Field(None, max_length=1024)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    def output_limit(self) -> Optional[int]:
        """``max_completion_tokens`` (current name) wins over ``max_tokens`` (legacy)."""
        return self.max_completion_tokens or self.max_tokens

    def logprobs_k(self) -> Optional[int]:
        """The internal ``SamplingParams.logprobs``: None off, else the top-k asked for."""
        return (self.top_logprobs or 0) if self.logprobs else None


#: A completions prompt: a string, strings (one choice each), token ids, token-id lists.
_Prompt = Union[str, list[str], list[int], list[list[int]]]


class CompletionRequest(_AgentSampling):
    prompt: _Prompt = Field(...)
    echo: Optional[bool] = False
    suffix: Optional[str] = None
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1, le=128)

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value):
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if any(isinstance(p, list) and not p for p in value):
                raise ValueError("a token-id prompt must not be empty")
            if any(isinstance(p, int) and p < 0 for p in value) or any(
                isinstance(p, list) and any(t < 0 for t in p) for p in value
            ):
                raise ValueError("token ids must be integers >= 0")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("suffix (fill-in-the-middle) is not supported by these models")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value, info: ValidationInfo):
        if value is not None and value != (info.data.get("n") or 1):
            raise ValueError("best_of is supported only equal to n (no server-side ranking)")
        return value

    def prompts(self) -> list[Union[str, tuple[int, ...]]]:
        """Each prompt: a string, or a token-id tuple."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [tuple(x for x in p if isinstance(x, int))]
        return [x if isinstance(x, str) else tuple(x) for x in p if not isinstance(x, int)]

    def output_limit(self) -> Optional[int]:
        return self.max_tokens


def unknown_fields(obj: BaseModel) -> list[str]:
    """Names of request fields Troupe ignores (for the log line)."""
    return sorted((obj.model_extra or {}).keys())


"""OpenAI-compatible request models (chat completions, completions).

Requests accept unknown fields (clients send new ones); the gateway logs their names.
Only what Troupe acts on is typed; everything typed is validated strictly enough that a
bad value is a 400 naming the field, never a 500.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ContentPart",
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


class ContentPart(_Lenient):
    """One part of a message's content list; only text parts are served by text models."""

    type: str
    text: Optional[str] = None


class ChatMessageIn(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ContentPart], None] = None
    name: Optional[str] = None

    def text(self) -> str:
        """Flatten the content to text (text parts joined by newlines)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text or "" for p in self.content)

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, value):
        if isinstance(value, list):
            for i, part in enumerate(value):
                if part.type != "text":
                    raise ValueError(
                        f"content part {i} has type {part.type!r}; this gateway's text "
                        "models accept only parts of type 'text'"
                    )
                if part.text is None:
                    raise ValueError(f"content part {i} of type 'text' needs a 'text' field")
        return value


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


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(..., min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)

    def output_limit(self) -> Optional[int]:
        """``max_completion_tokens`` (current name) wins over ``max_tokens`` (legacy)."""
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str]] = Field(...)
    echo: Optional[bool] = False
    suffix: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value):
        if isinstance(value, list):
            if len(value) != 1:
                raise ValueError(
                    "send exactly one prompt per request (a list of one string is accepted)"
                )
            return value[0]
        return value

    def prompt_text(self) -> str:
        """The one prompt (the validator already unwrapped a list of one)."""
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def output_limit(self) -> Optional[int]:
        return self.max_tokens




def unknown_fields(obj: BaseModel) -> list[str]:
    """Names of request fields Troupe ignores (for the log line)."""
    return sorted((obj.model_extra or {}).keys())


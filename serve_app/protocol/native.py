"""Native REST and WebSocket request models."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from serve_app.protocol.internal import MAX_TOP_LOGPROBS, TokenLogprob, ToolCallDelta
from serve_app.protocol.openai import ChatMessageIn, check_stop, stop_tuple
from serve_app.protocol.openai_tools import (
    NamedChoiceIn,
    ResponseFormatIn,
    ToolIn,
    check_logit_bias,
)

__all__ = [
    "InferenceRequest",
    "WSInference",
    "WSCancel",
    "INFERENCE_EXAMPLE",
    "WS_EXAMPLE",
    "logprobs_out",
    "tool_call_out",
]

INFERENCE_EXAMPLE = '{"model": "smollm2-135m", "prompt": "Say hello", "max_tokens": 32}'
WS_EXAMPLE = (
    '{"type": "inference", "id": "r1", "model": "smollm2-135m", '
    '"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'
)


class InferenceRequest(BaseModel):
    """``POST /inference`` and ``/inference/stream``: a prompt or chat messages."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(..., min_length=1, max_length=256)
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessageIn]] = Field(None, min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Union[str, list[str], None] = None
    #: Deadline tier routing (serve_app.gateway.deadline): validated against the model there.
    start_within: Optional[str] = Field(None, max_length=32)
    service_tier: Optional[str] = Field(None, max_length=32)
    #: A prompt goes to a chat model as one user turn (its chat template) unless raw.
    raw: bool = False
    # Agent fields, in the chat completions shapes (README: "Native and WebSocket agents").
    tools: Optional[list[ToolIn]] = Field(None, max_length=128)
    tool_choice: Union[Literal["auto", "none", "required"], NamedChoiceIn, None] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[ResponseFormatIn] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[dict[str, float]] = None

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        check_logit_bias(value)
        return value

    @model_validator(mode="after")
    def _prompt_xor_messages(self) -> "InferenceRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send exactly one of 'prompt' (a string) or 'messages' (a list)")
        return self

    @field_validator("stop")
    @classmethod
    def _valid_stop(cls, value):
        return check_stop(value)

    def stop_tuple(self) -> tuple[str, ...]:
        return stop_tuple(self.stop)


class WSInference(InferenceRequest):
    """WebSocket ``inference`` message: an ``InferenceRequest`` plus the client's ``id``."""

    type: str = "inference"
    id: str = Field(..., min_length=1, max_length=128)


class WSCancel(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str = "cancel"
    id: str = Field(..., min_length=1, max_length=128)


def logprobs_out(entries: Optional[list[TokenLogprob]], top: int) -> Optional[list[dict[str, Any]]]:
    """Native logprobs: ``[{"token", "token_id", "logprob", "top": [...]}]`` per token."""
    if entries is None:
        return None
    return [{"token": e.token, "token_id": e.token_id, "logprob": e.logprob,
             "top": [{"token": t, "token_id": i, "logprob": lp} for t, i, lp in e.top[:top]]}
            for e in entries]


def tool_call_out(delta: ToolCallDelta) -> dict[str, Any]:
    """A native tool call (or fragment): ``index``, ``arguments``, and ``id``/``name`` when set."""
    out: dict[str, Any] = {"index": delta.index}
    if delta.id is not None:
        out["id"] = delta.id
    if delta.name is not None:
        out["name"] = delta.name
    out["arguments"] = delta.arguments
    return out

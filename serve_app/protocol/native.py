"""Native REST and WebSocket request models."""

from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_app.protocol.openai import ChatMessageIn, check_stop, stop_tuple

__all__ = ["InferenceRequest", "WSInference", "WSCancel", "INFERENCE_EXAMPLE", "WS_EXAMPLE"]

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

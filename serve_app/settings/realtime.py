"""Settings of the Realtime API (``/v1/realtime``): default models and a session's bounds."""

from __future__ import annotations

from typing import Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["RealtimeSettings"]


class RealtimeSettings(BaseModel):
    """Which models a realtime session uses unless it names them, and its limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    llm: Optional[str] = Field(
        None, description="Text model when the client omits ?model= (default: the first text model).")
    asr: Optional[str] = Field(
        None, description="Speech-to-text model unless session.audio.input.transcription.model "
        "names one (default: the first transcription model).")
    tts: Optional[str] = Field(
        None, description="Text-to-speech model unless session.audio.output.model names one "
        "(default: the first speech model).")
    voice: str = Field("alloy", min_length=1, description="Default voice of spoken answers.")
    max_buffer_s: float = Field(
        120.0, gt=0, le=3600, description="Most seconds of audio the input buffer holds uncommitted.")
    max_event_bytes: int = Field(
        15 * 1024 * 1024, ge=1024, description="Largest client event (OpenAI's limit is 15 MiB).")
    max_output_tokens: int = Field(
        1024, ge=1, le=32768, description="Cap on an answer's tokens (max_output_tokens \"inf\").")
    proxy: list[str] = Field(
        default_factory=list, description="Ids of remote OpenAI engine models whose provider "
        "speaks the Realtime protocol itself (e.g. gpt-realtime): their sessions are passed "
        "through to {base_url}/realtime?model={engine.model} with the session actor's credential.")

"""The speech-to-text deployment: a plain class over one :class:`TranscriptionEngine`.

Uploaded audio is decoded by a library (PyAV/FFmpeg: WAV, FLAC, MP3, OGG, WebM, ...) to
16 kHz mono here, in the replica, so the gateway never touches codecs. Audio that does
not decode is the caller's mistake (400), never a server error.
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

from deployments.audio import AudioDecodeError, decode_audio
from deployments.engines.modality_base import TranscriptionEngine
from deployments.lifecycle import EngineHost
from serve_app.errors import InvalidRequest
from serve_app.protocol.modalities import TranscriptionRequest, TranscriptionResult
from serve_app.settings import ModelConfig

__all__ = ["TranscriptionDeployment", "MAX_AUDIO_SECONDS", "TRANSCRIPTION_EXAMPLE"]


MAX_AUDIO_SECONDS = 600.0
TRANSCRIPTION_EXAMPLE = (
    "curl -F model=whisper-tiny-en -F file=@speech.wav http://127.0.0.1:8000/v1/audio/transcriptions"
)


class TranscriptionDeployment(EngineHost):
    """Serves one speech recognition model."""

    def __init__(self, model: ModelConfig | dict[str, Any], engine: Optional[TranscriptionEngine] = None):
        super().__init__(model, engine)

    async def transcribe(self, request: TranscriptionRequest) -> TranscriptionResult:
        engine = await self._ready_engine()
        if request.language and engine.languages and request.language not in engine.languages:
            raise InvalidRequest(
                f"language {request.language!r} is not supported by model {self.model.id!r}; "
                f"it transcribes {', '.join(engine.languages)}. Omit language or send one of those.",
                param="language",
            )
        if not 0.0 <= request.temperature <= 1.0:
            raise InvalidRequest(
                f"temperature={request.temperature} is out of range: use 0 to 1.", param="temperature"
            )
        with self._counting():
            try:
                audio = await asyncio.to_thread(decode_audio, request.audio, 16000, MAX_AUDIO_SECONDS)
            except AudioDecodeError as exc:
                raise InvalidRequest(
                    f"The uploaded file {request.filename or '(unnamed)'!r} is not usable audio: "
                    f"{exc}. Send WAV, FLAC, MP3, OGG or WebM, e.g. {TRANSCRIPTION_EXAMPLE}",
                    param="file",
                ) from None
            with self._engine_errors("transcribing"):
                return await engine.transcribe(
                    audio, request.language, request.prompt, request.temperature
                )

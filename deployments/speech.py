"""The text-to-speech deployment: a plain class over one :class:`SpeechEngine`.

Input is spoken sentence by sentence; each sentence's audio is encoded as soon as it
exists and streamed to the caller, so playback can start before the text is finished.
OpenAI's voice names map onto the engine's own voices, so OpenAI clients work unchanged.
"""

from __future__ import annotations

from typing import Any, AsyncGenerator, Optional

from deployments.audio import StreamingEncoder
from deployments.engines.modality_base import OPENAI_VOICES, SpeechEngine
from deployments.lifecycle import EngineHost
from serve_app.errors import InvalidRequest
from serve_app.protocol.modalities import AUDIO_FORMATS, AudioChunk, SpeechRequest
from serve_app.settings import ModelConfig

__all__ = ["SpeechDeployment", "SPEECH_EXAMPLE", "MAX_SPEECH_CHARS", "voice_map"]


SPEECH_EXAMPLE = '{"model": "piper-joe", "input": "Hello there.", "voice": "alloy"}'
MAX_SPEECH_CHARS = 4096


def voice_map(engine_voices: list[str]) -> dict[str, str]:
    """Every OpenAI voice name and every engine voice -> an engine voice."""
    mapping = {name: engine_voices[i % len(engine_voices)] for i, name in enumerate(OPENAI_VOICES)}
    mapping.update({v: v for v in engine_voices})
    return mapping


class SpeechDeployment(EngineHost):
    """Serves one voice model."""

    def __init__(self, model: ModelConfig | dict[str, Any], engine: Optional[SpeechEngine] = None):
        super().__init__(model, engine)

    async def voices(self) -> dict[str, Any]:
        engine = await self._ready_engine()
        return {"voices": voice_map(engine.voices), "sample_rate": engine.sample_rate}

    def check(self, request: SpeechRequest, engine: SpeechEngine) -> str:
        """Validate; returns the engine voice to use."""
        if not request.text or not request.text.strip():
            raise InvalidRequest(
                f"input is empty: send the text to speak, e.g. {SPEECH_EXAMPLE}", param="input"
            )
        if len(request.text) > MAX_SPEECH_CHARS:
            raise InvalidRequest(
                f"input has {len(request.text)} characters; at most {MAX_SPEECH_CHARS} are "
                "spoken per request. Split the text into several requests.",
                param="input",
            )
        if request.format not in AUDIO_FORMATS:
            raise InvalidRequest(
                f"response_format {request.format!r} is not supported; use one of "
                f"{', '.join(AUDIO_FORMATS)}, e.g. {SPEECH_EXAMPLE[:-1]}, \"response_format\": \"wav\"}}",
                param="response_format",
            )
        if not 0.25 <= request.speed <= 4.0:
            raise InvalidRequest(
                f"speed={request.speed} is out of range: use 0.25 to 4.0 (1.0 is normal).",
                param="speed",
            )
        voices = voice_map(engine.voices)
        voice = voices.get(request.voice)
        if voice is None:
            raise InvalidRequest(
                f"voice {request.voice!r} is not available; use one of {', '.join(voices)}, "
                f"e.g. {SPEECH_EXAMPLE}",
                param="voice",
            )
        return voice

    async def synthesize(self, request: SpeechRequest) -> AsyncGenerator[AudioChunk, None]:
        """Encoded audio chunks, one or more per sentence; the last one has ``last`` set."""
        engine = await self._ready_engine()
        voice = self.check(request, engine)
        encoder = StreamingEncoder(request.format, engine.sample_rate)
        samples = 0
        with self._counting():
            blocks = engine.synthesize(request.text, voice, request.speed)
            try:
                with self._engine_errors("speaking"):
                    async for block in blocks:
                        samples += block.size
                        data = encoder.add(block)
                        if data:
                            yield AudioChunk(data, sample_rate=engine.sample_rate)
                    yield AudioChunk(
                        encoder.finish(),
                        last=True,
                        sample_rate=engine.sample_rate,
                        audio_seconds=samples / engine.sample_rate,
                        characters=len(request.text),
                    )
            finally:
                await blocks.aclose()

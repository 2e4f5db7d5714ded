"""The models behind a realtime session: speech-to-text, text and text-to-speech.

:class:`CoreModels` calls the three model deployments through the GatewayCore, exactly
as the ``/ws`` voice pipeline does, so each call keeps its own admission, errors,
cancellation (closing a stream aborts the engine request) and ledger row (route
``/v1/realtime``). The text model's row is the response's row: the gateway hands its
event back here instead of recording it, and :meth:`CoreModels.meter` records it once the
response has ended, with what only the session knows (audio seconds in and out, and the
time to first audio after the end of speech). :class:`RealtimeMetrics` adds Prometheus
counters of audio seconds and responses; the TTFA histogram comes from the ledger.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Optional, Protocol

from serve_app.errors import InvalidRequest
from serve_app.gateway.metering import RequestInfo
from serve_app.gateway.voice import wav_from_pcm
from serve_app.protocol.internal import GenerationRequest, TextChunk
from serve_app.protocol.metrics import RequestEvent
from serve_app.protocol.modalities import (
    AudioChunk,
    SpeechRequest,
    TranscriptionRequest,
)

__all__ = ["ROUTE", "CoreModels", "Models", "RealtimeMetrics", "ResponseFigures", "Trio"]

ROUTE = "/v1/realtime"
logger = logging.getLogger("troupe.realtime")


@dataclass(frozen=True, slots=True)
class Trio:
    """The three models a session uses."""

    asr: Optional[str]  # None: no speech-to-text model is configured (text input only)
    llm: str
    tts: Optional[str]  # None: a text-only session


class Models(Protocol):
    """What a session needs from the models (fakes implement it in unit tests)."""

    def resolve(self, llm: str, asr: Optional[str], tts: Optional[str], audio_out: bool) -> Trio: ...

    async def transcribe(self, asr: str, pcm16: bytes, rate: int, request_id: str,
                         language: Optional[str], prompt: Optional[str]) -> str: ...

    def generate(self, llm: str, request: GenerationRequest) -> AsyncGenerator[TextChunk, None]: ...

    def speak(self, tts: str, text: str, voice: str, speed: float,
              request_id: str) -> AsyncGenerator[AudioChunk, None]: ...

    def price(self, llm: str, prompt_tokens: int, completion_tokens: int) -> Optional[float]: ...

    def meter(self, request_id: str, figures: "ResponseFigures") -> None:
        """Record the text model's request ``request_id`` with the response's figures."""


class CoreModels:
    """:class:`Models` over a GatewayCore (defaults from ``settings.realtime``)."""

    def __init__(self, core: Any) -> None:
        self.core = core
        self.settings = core.settings.realtime
        self.info = RequestInfo(ROUTE, stream=True)
        #: Text model events waiting for their response's figures, by request id.
        self.held: dict[str, RequestEvent] = {}
        self.text_info = RequestInfo(ROUTE, stream=True, hold=self._hold)

    def _hold(self, event: RequestEvent) -> None:
        self.held[event.event_id] = event

    def _pick(self, given: Optional[str], configured: Optional[str], modality: str, param: str,
              required: bool = True) -> Optional[str]:
        model_id = given or configured or next(
            (m.id for m in self.core.models.values() if m.modality == modality), None)
        if model_id is None:
            if not required:
                return None
            raise InvalidRequest(f"No {modality} model is configured, so /v1/realtime cannot run "
                                 "this session; add one to the config.", param=param)
        self.core.admit(model_id, modality, ROUTE)
        return model_id

    def resolve(self, llm: str, asr: Optional[str], tts: Optional[str], audio_out: bool) -> Trio:
        text = self._pick(llm, self.settings.llm, "text", "model")
        assert text is not None
        speech_in = self._pick(asr, self.settings.asr, "transcription",
                               "session.audio.input.transcription.model", required=asr is not None)
        speech_out = None
        if audio_out or tts is not None:
            speech_out = self._pick(tts, self.settings.tts, "speech", "session.audio.output.model")
        return Trio(speech_in, text, speech_out)

    async def transcribe(self, asr: str, pcm16: bytes, rate: int, request_id: str,
                         language: Optional[str], prompt: Optional[str]) -> str:
        request = TranscriptionRequest(request_id, wav_from_pcm(pcm16, rate), "realtime.wav",
                                       language, prompt)
        result = await self.core.transcribe(asr, request, self.info)
        return result.text.strip()

    async def generate(self, llm: str, request: GenerationRequest) -> AsyncGenerator[TextChunk, None]:
        async with contextlib.aclosing(self.core.stream(llm, request, self.text_info)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def speak(self, tts: str, text: str, voice: str, speed: float,
                    request_id: str) -> AsyncGenerator[AudioChunk, None]:
        request = SpeechRequest(request_id, text, voice, "pcm", speed)
        async with contextlib.aclosing(self.core.speak(tts, request, self.info)) as chunks:
            async for chunk in chunks:
                yield chunk

    def price(self, llm: str, prompt_tokens: int, completion_tokens: int) -> Optional[float]:
        return self.core.prices.quote(llm, prompt_tokens, completion_tokens)

    def meter(self, request_id: str, figures: "ResponseFigures") -> None:
        event = self.held.pop(request_id, None)
        record = self.core.record
        if event is None or record is None:  # the text model was never called
            return
        event.audio_in_s = round(figures.audio_in_s, 3)
        event.audio_out_s = round(figures.audio_out_s, 3)
        event.ttfa_ms = figures.ttfa_ms
        record(event)


@dataclass(slots=True)
class ResponseFigures:
    """What one response measured (also sent to the client in ``response.done``)."""

    model: str
    status: str
    audio_in_s: float = 0.0
    audio_out_s: float = 0.0
    ttfa_ms: Optional[float] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0


class RealtimeMetrics:
    """Per-response figures to the metrics actor's custom metrics (fire-and-forget).

    Exposed as ``troupe_custom_realtime_*``: counters of audio seconds in and out and of
    responses by status. TTFA is a histogram of the ledger (``troupe_realtime_ttfa_seconds``),
    from the response's row.
    """

    def __init__(self, actor: Any = None) -> None:
        self.actor = actor

    def record(self, fig: ResponseFigures) -> None:
        if self.actor is None:
            return
        labels = {"model": fig.model}
        self._send("realtime_audio_input_seconds_total", "counter", fig.audio_in_s, labels)
        self._send("realtime_audio_output_seconds_total", "counter", fig.audio_out_s, labels)
        self._send("realtime_responses_total", "counter", 1, {**labels, "status": fig.status})

    def _send(self, name: str, kind: str, value: float, labels: dict[str, str]) -> None:
        try:
            self.actor.record_custom.remote(name, kind, value, labels)
        except Exception:  # metrics must never break a conversation
            logger.warning("could not send realtime metric %s", name, exc_info=True)

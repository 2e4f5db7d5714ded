"""The voice pipeline: audio in -> transcript -> the LLM's reply (streamed) -> reply audio.

One async generator, :func:`voice_events`, drives it through the three model deployments
(speech-to-text, text, text-to-speech) over GatewayCore, so each model keeps its own
metering, errors and load state. Reply audio is produced sentence by sentence while the
LLM is still writing, as raw 16-bit PCM (concatenable). ``POST /voice/pipeline``
(``serve_app/routes/voice.py``) collects the events into one JSON answer; ``/ws``
(``voice.start`` / binary frames / ``voice.end``)
forwards them as they come (:class:`VoiceSocket`).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Optional

from serve_app.errors import InvalidRequest, RequestTooLarge, TroupeError
from serve_app.gateway.metering import RequestInfo
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams
from serve_app.protocol.modalities import SpeechRequest, TranscriptionRequest

__all__ = ["VoiceOptions", "voice_events", "VoiceSocket", "wav_from_pcm", "PIPELINE_EXAMPLE"]

SYSTEM_PROMPT = "You are a helpful voice assistant. Answer briefly, in one or two sentences."
_SENTENCE_END = re.compile(r"[.!?](\s|$)")
PIPELINE_EXAMPLE = (
    "curl --data-binary @question.wav -H 'Content-Type: audio/wav' "
    "'http://127.0.0.1:8000/voice/pipeline?llm=smollm2-135m&voice=alloy'"
)


def wav_from_pcm(pcm: bytes, sample_rate: int) -> bytes:
    """A mono 16-bit WAV file around raw little-endian PCM."""
    import struct

    return (
        b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data" + struct.pack("<I", len(pcm)) + pcm
    )


@dataclass
class VoiceOptions:
    asr: Optional[str] = None
    llm: Optional[str] = None
    tts: Optional[str] = None
    voice: str = "alloy"
    max_tokens: int = 96
    temperature: float = 0.0

    def resolved(self, core: Any, route: str) -> "VoiceOptions":
        """Fill defaults (the first model of each modality) and check each model fits."""
        def pick(given: Optional[str], modality: str, name: str) -> str:
            model_id = given or next((m.id for m in core.models.values() if m.modality == modality), None)
            if model_id is None:
                raise InvalidRequest(f"No {modality} model is configured, so {route} cannot run.", param=name)
            core.admit(model_id, modality, route)
            return model_id

        if not 1 <= self.max_tokens <= 1024:
            raise InvalidRequest("max_tokens must be 1 to 1024.", param="max_tokens")
        return VoiceOptions(pick(self.asr, "transcription", "asr"), pick(self.llm, "text", "llm"),
                            pick(self.tts, "speech", "tts"), self.voice, self.max_tokens, self.temperature)


async def voice_events(
    core: Any, audio: bytes, filename: str, opts: VoiceOptions, request_id: str, route: str
) -> AsyncIterator[tuple[str, Any]]:
    """``("transcript", text)``, ``("token", text)``..., ``("audio.start", {format,
    sample_rate})``, ``("audio", bytes)``..., ``("audio.end", None)``, ``("complete", info)``."""
    info = RequestInfo(route, stream=True)
    started = time.perf_counter()
    heard = await core.transcribe(opts.asr, TranscriptionRequest(request_id + ":asr", audio, filename), info)
    transcript_at = time.perf_counter()
    yield "transcript", heard.text
    if not heard.text.strip():
        raise InvalidRequest("No speech was heard in the audio; record a question and send it again.",
                             param="audio")
    request = GenerationRequest(
        request_id + ":llm",
        SamplingParams(max_tokens=opts.max_tokens, temperature=opts.temperature),
        [ChatMessage("system", SYSTEM_PROMPT), ChatMessage("user", heard.text)],
    )
    pending = ""
    reply: list[str] = []
    usage: dict[str, int] = {}
    speaker = _Speaker(core, opts, request_id + ":tts", info)
    stream = core.stream(opts.llm, request, info)
    try:
        async for chunk in stream:
            if chunk.text:
                reply.append(chunk.text)
                pending += chunk.text
                yield "token", chunk.text
            if chunk.finish_reason is not None:
                usage = chunk.usage()
            # speak each finished sentence while the model keeps writing the next one
            sentences, pending = _finished_sentences(pending)
            if sentences:
                async for event in speaker.speak(sentences):
                    yield event
    finally:
        await stream.aclose()
    async for event in speaker.speak(pending):
        yield event
    if speaker.started:
        yield "audio.end", None
    now = time.perf_counter()
    first_audio_at = speaker.first_audio_at
    yield "complete", {
        "transcript": heard.text,
        "reply": "".join(reply),
        "usage": usage,
        "audio_seconds": round(speaker.seconds, 3),
        "models": {"asr": opts.asr, "llm": opts.llm, "tts": opts.tts},
        "latency_ms": {
            "transcript": round((transcript_at - started) * 1000, 1),
            "first_audio": None if first_audio_at is None else round((first_audio_at - started) * 1000, 1),
            "total": round((now - started) * 1000, 1),
        },
    }


def _finished_sentences(pending: str) -> tuple[str, str]:
    """(the finished sentences, the unfinished rest) of the reply text not spoken yet."""
    ends = [match.end() for match in _SENTENCE_END.finditer(pending)]
    if not ends:
        return "", pending
    return pending[: ends[-1]], pending[ends[-1]:]


class _Speaker:
    """Speaks a reply piece by piece; remembers whether audio started, when, and how much."""

    def __init__(self, core: Any, opts: VoiceOptions, request_id: str, info: RequestInfo) -> None:
        self.core = core
        self.opts = opts
        self.request_id = request_id
        self.info = info
        self.started = False
        self.seconds = 0.0
        self.first_audio_at: Optional[float] = None

    async def speak(self, text: str) -> AsyncIterator[tuple[str, Any]]:
        """``("audio.start", format)`` before the first audio, then ``("audio", pcm)``..."""
        if not text.strip():
            return
        speech = SpeechRequest(self.request_id, text, self.opts.voice, "pcm")
        async for chunk in self.core.speak(self.opts.tts, speech, self.info):
            if not self.started:
                self.started = True
                yield "audio.start", {"format": "pcm", "sample_rate": chunk.sample_rate,
                                      "sample_format": "s16le", "channels": 1}
            if chunk.data:
                if self.first_audio_at is None:
                    self.first_audio_at = time.perf_counter()
                yield "audio", chunk.data
            if chunk.last:
                self.seconds += chunk.audio_seconds


class VoiceSocket:
    """The voice part of one WebSocket: one utterance at a time.

    ``voice.start`` {id, format, sample_rate, asr, llm, tts, voice} opens it; binary frames
    carry the audio (a file's bytes, or raw s16le PCM when ``format`` is "pcm");
    ``voice.end`` {id} runs the pipeline and streams ``transcript``, ``token``...,
    ``audio.start``, binary frames, ``audio.end`` and ``complete``, or one ``error``.
    """

    def __init__(self, core: Any, send: Callable[[dict[str, Any]], Awaitable[None]],
                 send_bytes: Callable[[bytes], Awaitable[None]], socket_id: str) -> None:
        self.core = core
        self.send = send
        self.send_bytes = send_bytes
        self.socket_id = socket_id
        self.max_bytes = core.settings.gateway.max_body_bytes
        self.current: Optional[dict[str, Any]] = None
        self.buffer = bytearray()

    @property
    def open(self) -> bool:
        return self.current is not None

    def start(self, data: dict[str, Any]) -> None:
        vid = data.get("id")
        if not isinstance(vid, str) or not vid:
            raise InvalidRequest('voice.start needs an "id": {"type": "voice.start", "id": "v1", "format": "wav"}')
        if self.current is not None:
            raise InvalidRequest(f"Utterance {self.current['id']!r} is still open; send voice.end first.")
        fmt = data.get("format", "wav")
        rate = data.get("sample_rate", 16000)
        if fmt == "pcm" and not (isinstance(rate, int) and 8000 <= rate <= 48000):
            raise InvalidRequest("format pcm needs sample_rate 8000..48000 (16-bit mono little-endian).")
        opts = VoiceOptions(data.get("asr"), data.get("llm"), data.get("tts"), data.get("voice", "alloy"),
                            int(data.get("max_tokens", 96)))
        opts = opts.resolved(self.core, "/ws voice")
        self.current = {"id": vid, "format": fmt, "sample_rate": rate, "opts": opts}
        self.buffer = bytearray()

    def add(self, data: bytes) -> None:
        if len(self.buffer) + len(data) > self.max_bytes:
            self.current = None
            self.buffer = bytearray()
            raise RequestTooLarge(f"The utterance exceeds {self.max_bytes} bytes; it was dropped.")
        self.buffer += data

    async def end(self, data: dict[str, Any]) -> None:
        current, self.current = self.current, None
        if current is None or data.get("id") != current["id"]:
            raise InvalidRequest("voice.end must name the open utterance's id (send voice.start first).")
        vid = current["id"]
        audio = bytes(self.buffer)
        self.buffer = bytearray()
        if not audio:
            raise InvalidRequest("No audio frames arrived between voice.start and voice.end.")
        if current["format"] == "pcm":
            audio = wav_from_pcm(audio, current["sample_rate"])
        async for kind, value in voice_events(self.core, audio, f"ws.{current['format']}", current["opts"],
                                              f"{self.socket_id}:{vid}", "/ws"):
            if kind == "audio":
                await self.send_bytes(value)
            elif kind == "transcript":
                await self.send({"type": "transcript", "id": vid, "text": value})
            elif kind == "token":
                await self.send({"type": "token", "id": vid, "token": value})
            elif kind == "audio.start":
                await self.send({"type": "audio.start", "id": vid, **value})
            elif kind == "audio.end":
                await self.send({"type": "audio.end", "id": vid})
            else:
                await self.send({"type": "complete", "id": vid, **value})


async def run_voice_end(voice: VoiceSocket, data: dict[str, Any],
                        on_error: Callable[[TroupeError, Optional[str]], Awaitable[None]]) -> None:
    """voice.end as a task: any failure ends the utterance with one error message."""
    vid = data.get("id") if isinstance(data.get("id"), str) else None
    try:
        await voice.end(data)
    except TroupeError as err:
        await on_error(err, vid)

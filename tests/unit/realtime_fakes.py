"""Fakes for realtime session tests: models that answer, a VAD that hears loudness.

The fake models keep the real contract: ``generate`` and ``speak`` are async generators
that stop when closed (and count their active requests, as engines do), chunks are the
real internal types, and audio is real 16-bit PCM at the speech model's own rate.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from typing import Any, AsyncIterator, Optional

import numpy as np

from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import ChatMessage, GenerationRequest, NamedTool, TextChunk, ToolCallDelta
from serve_app.protocol.modalities import AudioChunk
from serve_app.protocol.realtime import SessionConfig
from serve_app.realtime.models import Trio
from serve_app.realtime.session import RealtimeSession, SessionLimits

TTS_RATE = 22050


class LoudnessVad:
    """Speech probability = how loud the frame is (a tone is speech, silence is not)."""

    def __call__(self, frame: np.ndarray) -> float:
        return float(min(1.0, np.sqrt(np.mean(frame * frame)) * 10))


class FakeModels:
    """The three models: a fixed transcript, a scripted answer, a tone per sentence."""

    def __init__(self, answer: str = "Paris is the capital. It is in France.",
                 token_delay_s: float = 0.0, transcript: str = "what is the capital of france") -> None:
        self.answer = answer
        self.token_delay_s = token_delay_s
        self.transcript = transcript
        self.active = {"asr": 0, "llm": 0, "tts": 0}
        self.prompts: list[list[ChatMessage]] = []
        self.heard: list[tuple[int, int]] = []  # (bytes, rate) of each transcription
        self.requests: list[GenerationRequest] = []
        self.metered: list[tuple[str, Any]] = []  # (request id, figures) per response

    def resolve(self, llm: str, asr: Optional[str], tts: Optional[str], audio_out: bool) -> Trio:
        if llm != "llm":
            raise InvalidRequest(f"Model {llm!r} is not served here.", param="model")
        return Trio(asr or "asr", llm, tts or ("tts" if audio_out else None))

    async def transcribe(self, asr: str, pcm16: bytes, rate: int, request_id: str,
                         language: Optional[str], prompt: Optional[str]) -> str:
        self.heard.append((len(pcm16), rate))
        return self.transcript

    async def generate(self, llm: str, request: GenerationRequest) -> AsyncIterator[TextChunk]:
        messages = request.messages or []
        self.prompts.append(messages)
        self.requests.append(request)
        self.active["llm"] += 1
        try:
            call = self._call(request)
            if call is not None:  # a tool call, its arguments in two fragments, as engines stream
                name, arguments = call
                half = len(arguments) // 2
                yield TextChunk("", 1, prompt_tokens=7,
                                tool_calls=[ToolCallDelta(0, "call_fake0", name, arguments[:half])])
                yield TextChunk("", 1, prompt_tokens=7, tool_calls=[ToolCallDelta(0, arguments=arguments[half:])])
                yield TextChunk("", 0, "tool_calls", prompt_tokens=7, completion_tokens=2)
                return
            words = self.answer.split(" ")
            limit = request.sampling.max_tokens
            for n, word in enumerate(words[:limit]):
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)  # a slow engine, not synchronisation
                yield TextChunk(("" if n == 0 else " ") + word, 1, prompt_tokens=7)
            yield TextChunk("", 0, "stop", prompt_tokens=7, completion_tokens=len(words))
        finally:
            self.active["llm"] -= 1

    @staticmethod
    def _call(request: GenerationRequest) -> Optional[tuple[str, str]]:
        """The tool to call when the choice forces one (``auto`` answers in text), with
        "Paris" for each required property."""
        choice = request.tool_choice
        if not request.tools or choice in ("auto", "none"):
            return None
        tool = next((t for t in request.tools if isinstance(choice, NamedTool) and t.name == choice.name),
                    request.tools[0])
        required = tool.parameters.get("required", [])
        return tool.name, json.dumps({key: "Paris" for key in required})

    async def speak(self, tts: str, text: str, voice: str, speed: float,
                    request_id: str) -> AsyncIterator[AudioChunk]:
        self.active["tts"] += 1
        try:
            seconds = 0.1 * len(text.split())
            t = np.arange(int(TTS_RATE * seconds)) / TTS_RATE
            pcm = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2").tobytes()
            yield AudioChunk(pcm, sample_rate=TTS_RATE)
            yield AudioChunk(b"", last=True, sample_rate=TTS_RATE, audio_seconds=seconds)
        finally:
            self.active["tts"] -= 1

    def price(self, llm: str, prompt_tokens: int, completion_tokens: int) -> Optional[float]:
        return 0.0

    def meter(self, request_id: str, figures: Any) -> None:
        self.metered.append((request_id, figures))


class Client:
    """Drives a session as a client would and records every server event."""

    def __init__(self, models: Optional[FakeModels] = None, **config: Any) -> None:
        self.models = models or FakeModels()
        self.events: list[dict[str, Any]] = []
        self.changed = asyncio.Event()
        cfg = SessionConfig.model_validate({"model": "llm", **config})
        self.session = RealtimeSession(self.models, cfg, self._emit, "sess_test",
                                       SessionLimits(max_buffer_s=5.0), vad_model=LoudnessVad)

    async def _emit(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self.changed.set()

    async def send(self, event: dict[str, Any]) -> None:
        await self.session.handle(event)

    async def append_pcm(self, pcm: bytes, rate: int = 24000, chunk_ms: int = 20) -> None:
        step = rate * 2 * chunk_ms // 1000
        for i in range(0, len(pcm), step):
            await self.send({"type": "input_audio_buffer.append",
                             "audio": base64.b64encode(pcm[i:i + step]).decode()})

    def types(self) -> list[str]:
        return [e["type"] for e in self.events]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["type"] == kind]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 5.0) -> dict[str, Any]:
        """The ``count``-th event of ``kind`` (waits on new events, with a deadline)."""
        deadline = time.monotonic() + timeout
        while len(self.of(kind)) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {kind} #{count} within {timeout}s; got {self.types()}")
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except TimeoutError:
                pass
        return self.of(kind)[count - 1]


def tone(seconds: float, rate: int = 24000, amplitude: float = 0.3) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    return (np.sin(2 * np.pi * 300 * t) * amplitude * 32767).astype("<i2").tobytes()


def silence(seconds: float, rate: int = 24000) -> bytes:
    return bytes(int(rate * seconds) * 2)

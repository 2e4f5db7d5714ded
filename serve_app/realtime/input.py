"""The input audio buffer of a realtime session, and its turn detector.

Audio is kept as 16-bit PCM at the input format's rate. The protocol's times
(``audio_start_ms`` / ``audio_end_ms``) count from the first audio of the session, so the
buffer knows where on that clock it starts. With server VAD, audio between turns is
trimmed to the prefix padding, so a quiet open microphone never fills the buffer.
"""

from __future__ import annotations

from typing import Callable, Optional

from serve_app.errors import InvalidRequest
from serve_app.protocol.realtime import TurnDetection
from serve_app.realtime.audio import AudioFormat
from serve_app.realtime.vad import (
    FRAME,
    VAD_RATE,
    SpeechModel,
    TurnDetector,
    VadEvent,
    VadSettings,
)

__all__ = ["InputBuffer"]


class InputBuffer:
    """PCM waiting to be committed, on the session's audio clock."""

    def __init__(self, fmt: AudioFormat, turn_detection: Optional[TurnDetection], max_s: float,
                 vad_model: Optional[Callable[[], SpeechModel]] = None) -> None:
        self.max_s = max_s
        self.vad_model = vad_model
        self.pcm = bytearray()
        self.start_ms = 0
        self.appended_ms = 0.0
        self.fmt = fmt
        self.turn_detection = turn_detection
        self.detector: Optional[TurnDetector] = None
        self.configure(fmt, turn_detection)

    def configure(self, fmt: AudioFormat, turn_detection: Optional[TurnDetection]) -> None:
        """A new format or turn detection (``session.update``); a buffer in another format
        is dropped, since its bytes would be read wrongly."""
        if fmt != self.fmt:
            self.clear()
        self.fmt, self.turn_detection = fmt, turn_detection
        if turn_detection is None:
            self.detector = None
            return
        td = turn_detection
        settings = VadSettings(td.threshold, td.prefix_padding_ms, td.silence_duration_ms)
        factory = {"model_factory": self.vad_model} if self.vad_model else {}
        self.detector = TurnDetector(fmt.rate, settings, **factory)
        self.detector.frames = int(self.appended_ms * VAD_RATE / 1000) // FRAME  # same clock

    @property
    def ms(self) -> int:
        return self.fmt.ms_of(len(self.pcm))

    @property
    def speaking(self) -> bool:
        return self.detector is not None and self.detector.speaking

    def append(self, pcm: bytes) -> list[VadEvent]:
        """Add audio; returns the turn events it completes (server VAD).

        Raises:
            InvalidRequest: the buffer would exceed ``max_s`` (the audio is dropped).
        """
        limit = int(self.max_s * self.fmt.rate) * 2
        if len(self.pcm) + len(pcm) > limit:
            raise InvalidRequest(
                f"The input audio buffer would exceed {self.max_s:g} s; this append was dropped. "
                "Commit or clear the buffer (or let server VAD commit it).",
                param="audio", details={"realtime_code": "input_audio_buffer_full"})
        self.pcm += pcm
        self.appended_ms += len(pcm) * 1000 / (2 * self.fmt.rate)
        if self.detector is None:
            return []
        events = self.detector.feed(pcm)
        if not self.detector.speaking and not events:
            self._trim()
        return events

    def _trim(self) -> None:
        """Between turns only the prefix padding (and a little more) is kept."""
        padding = self.turn_detection.prefix_padding_ms if self.turn_detection else 0
        keep = (padding + 100) * self.fmt.rate * 2 // 1000
        if len(self.pcm) > 2 * keep:
            self._drop(len(self.pcm) - keep)

    def _drop(self, n: int) -> None:
        n = max(0, min(n - n % 2, len(self.pcm)))
        del self.pcm[:n]
        self.start_ms = int(self.appended_ms) - self.ms

    def speech_started(self, start_ms: int) -> None:
        """Speech was heard from ``start_ms`` (padding included): drop what came before."""
        self._drop((start_ms - self.start_ms) * self.fmt.rate * 2 // 1000)

    def take(self) -> bytes:
        """The buffer's audio, leaving it empty (a commit)."""
        pcm = bytes(self.pcm)
        self.clear()
        return pcm

    def clear(self) -> None:
        self.pcm = bytearray()
        self.start_ms = int(self.appended_ms)
        if self.detector is not None:
            self.detector.restart()

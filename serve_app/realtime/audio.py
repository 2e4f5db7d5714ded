"""Audio formats of the Realtime protocol, and the conversions between them and the models.

The protocol carries base64 audio in one of three formats: ``audio/pcm`` (16-bit
little-endian mono at 24 kHz), ``audio/pcmu`` (G.711 u-law, 8 kHz) and ``audio/pcma``
(G.711 a-law, 8 kHz). Inside a session every input is kept as 16-bit PCM at the format's
own rate; the VAD hears it at 16 kHz, the ASR gets it as a WAV file, and TTS output is
resampled to the session's output rate. G.711 is the standard library's ``audioop``
(``audioop-lts`` on Python 3.13+); resampling is ``soxr`` (streaming, so chunk edges leave
no clicks).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np
import soxr

with warnings.catch_warnings():  # deprecated in 3.11-3.12, provided by audioop-lts after
    warnings.simplefilter("ignore", DeprecationWarning)
    import audioop

__all__ = ["FORMATS", "AudioFormat", "BadAudio", "Resampler", "parse_format"]


class BadAudio(ValueError):
    """Audio bytes that cannot be in the declared format."""


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """One wire format: its protocol name, sample rate and bytes per sample."""

    type: str
    rate: int
    sample_bytes: int

    def to_pcm16(self, data: bytes) -> bytes:
        """Wire bytes -> 16-bit little-endian PCM at :attr:`rate`."""
        if self.type == "audio/pcm":
            if len(data) % 2:
                raise BadAudio(f"audio/pcm is 16-bit samples, but {len(data)} bytes is an odd count")
            return data
        if self.type == "audio/pcmu":
            return audioop.ulaw2lin(data, 2)
        return audioop.alaw2lin(data, 2)

    def from_pcm16(self, pcm: bytes) -> bytes:
        """16-bit PCM at :attr:`rate` -> wire bytes."""
        if self.type == "audio/pcm":
            return pcm
        if self.type == "audio/pcmu":
            return audioop.lin2ulaw(pcm, 2)
        return audioop.lin2alaw(pcm, 2)

    def ms_of(self, pcm16_bytes: int) -> int:
        """Milliseconds of ``pcm16_bytes`` bytes of 16-bit PCM at this rate."""
        return pcm16_bytes * 1000 // (2 * self.rate)

    def as_dict(self) -> dict[str, object]:
        return {"type": self.type, "rate": self.rate}


FORMATS = {
    "audio/pcm": AudioFormat("audio/pcm", 24000, 2),
    "audio/pcmu": AudioFormat("audio/pcmu", 8000, 1),
    "audio/pcma": AudioFormat("audio/pcma", 8000, 1),
}
#: Names of the beta protocol, still sent by older clients.
_LEGACY = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}


def parse_format(value: object, param: str) -> AudioFormat:
    """A session's ``format`` object (or a beta name) -> :class:`AudioFormat`.

    Raises:
        ValueError: naming ``param`` and the accepted formats.
    """
    name: Optional[object] = value
    rate: object = None
    if isinstance(value, dict):
        name, rate = value.get("type"), value.get("rate")
    if isinstance(name, str):
        name = _LEGACY.get(name, name)
    fmt = FORMATS.get(name) if isinstance(name, str) else None
    if fmt is None:
        raise ValueError(f"{param}: unsupported audio format {value!r}; use "
                         '{"type": "audio/pcm", "rate": 24000}, {"type": "audio/pcmu"} or '
                         '{"type": "audio/pcma"}')
    if rate is not None and rate != fmt.rate:
        raise ValueError(f"{param}.rate: {fmt.type} is {fmt.rate} Hz here, not {rate!r}")
    return fmt


class Resampler:
    """Streaming 16-bit PCM rate conversion (one per direction and stream)."""

    def __init__(self, in_rate: int, out_rate: int) -> None:
        self.in_rate = in_rate
        self.out_rate = out_rate
        self._stream = (None if in_rate == out_rate
                        else soxr.ResampleStream(in_rate, out_rate, 1, dtype="int16", quality="HQ"))

    def __call__(self, pcm: bytes, last: bool = False) -> bytes:
        if self._stream is None:
            return pcm
        samples = np.frombuffer(pcm, dtype="<i2")
        return self._stream.resample_chunk(samples, last=last).astype("<i2").tobytes()


def pcm16_to_float(pcm: bytes) -> np.ndarray:
    """16-bit PCM -> float32 in [-1, 1)."""
    return np.frombuffer(pcm, dtype="<i2").astype(np.float32) / 32768.0

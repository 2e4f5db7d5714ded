"""Internal request/result types of the non-text modalities (they cross Ray handles).

The gateway translates each API's body into one of these; deployments and engines see
only these. Small slotted dataclasses; no Ray, no torch, no numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

__all__ = [
    "EmbeddingRequest",
    "EmbeddingResult",
    "SpeechRequest",
    "AudioChunk",
    "TranscriptionRequest",
    "TranscriptionSegment",
    "TranscriptionResult",
    "ImageRequest",
    "ImageResult",
    "AUDIO_FORMATS",
    "AUDIO_MEDIA_TYPES",
]

#: Speech output formats, and their media types.
AUDIO_MEDIA_TYPES = {
    "mp3": "audio/mpeg",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
    "opus": "audio/ogg",
    "flac": "audio/flac",
    "aac": "audio/aac",
}
AUDIO_FORMATS = tuple(AUDIO_MEDIA_TYPES)


@dataclass(slots=True)
class EmbeddingRequest:
    """Texts (or token id arrays) to embed; one vector per input, in order."""

    request_id: str
    inputs: list[Union[str, list[int]]]
    dimensions: Optional[int] = None
    dispatched_at: float = 0.0


@dataclass(slots=True)
class EmbeddingResult:
    """Unit-length float32 vectors as raw little-endian bytes (cheap to pickle), one per input."""

    vectors: list[bytes]
    dimensions: int
    prompt_tokens: int
    queue_ms: Optional[float] = None


@dataclass(slots=True)
class SpeechRequest:
    """Text to speak; the deployment streams encoded audio in ``format``."""

    request_id: str
    text: str
    voice: str
    format: str = "mp3"
    speed: float = 1.0
    dispatched_at: float = 0.0


@dataclass(slots=True)
class AudioChunk:
    """Encoded audio bytes; the last chunk has ``last`` and the totals."""

    data: bytes
    last: bool = False
    sample_rate: int = 0
    audio_seconds: float = 0.0
    characters: int = 0


@dataclass(slots=True)
class TranscriptionRequest:
    """An uploaded audio file (any container a library decodes) to transcribe."""

    request_id: str
    audio: bytes
    filename: str = ""
    language: Optional[str] = None
    prompt: Optional[str] = None
    temperature: float = 0.0
    dispatched_at: float = 0.0


@dataclass(slots=True)
class TranscriptionSegment:
    """One timed piece of a transcript; the decoder's own figures where it reports them
    (Whisper does: its token ids, mean log-probability, compression ratio, no-speech
    probability and the temperature that produced it)."""

    id: int
    start: float
    end: float
    text: str
    seek: int = 0
    tokens: list[int] = field(default_factory=list)
    temperature: Optional[float] = None
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass(slots=True)
class TranscriptionResult:
    text: str
    language: str
    duration: float
    segments: list[TranscriptionSegment] = field(default_factory=list)


@dataclass(slots=True)
class ImageRequest:
    """``n`` images of ``width`` x ``height``; ``prompt`` (and ``seed``) pick the output."""

    request_id: str
    prompt: str
    n: int = 1
    width: int = 64
    height: int = 64
    seed: Optional[int] = None
    dispatched_at: float = 0.0


@dataclass(slots=True)
class ImageResult:
    """PNG files, one per image."""

    images: list[bytes]
    revised_prompt: Optional[str] = None

"""Engine interfaces of the non-text modalities (built by ``deployments.engines.registry``).

One small async interface per modality. Engines do the model work only; input checks,
encoding (PNG, mp3...) and metering live in the deployments and the gateway. Engines run
blocking model calls in a worker thread so a replica keeps answering health checks.

Adding an engine means a module and one line in the registry; no route changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import AsyncIterator, Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np

from serve_app.protocol.modalities import TranscriptionResult

__all__ = [
    "EmbeddingEngine",
    "EmbedOutput",
    "SpeechEngine",
    "TranscriptionEngine",
    "ImageEngine",
    "OPENAI_VOICES",
]

#: OpenAI's voice names; every speech engine accepts them (mapped to its own voices).
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
)


@dataclass(slots=True)
class EmbedOutput:
    """Unit-length float32 vectors [N, D] and each input's token count."""

    vectors: np.ndarray
    token_counts: list[int]


@runtime_checkable
class EmbeddingEngine(Protocol):
    dimensions: int
    max_input_tokens: int
    #: Vectors may be truncated to fewer dimensions (Matryoshka-trained models).
    supports_dimensions: bool

    async def start(self) -> None: ...

    def count_tokens(self, inputs: Sequence[Union[str, list[int]]]) -> list[int]:
        """Tokens per input (to refuse oversized ones before the batch runs)."""

    async def embed(self, inputs: Sequence[Union[str, list[int]]]) -> EmbedOutput: ...

    async def shutdown(self) -> None: ...


@runtime_checkable
class SpeechEngine(Protocol):
    sample_rate: int
    #: The engine's own voice names (OpenAI's names map onto them).
    voices: list[str]

    async def start(self) -> None: ...

    def synthesize(self, text: str, voice: str, speed: float) -> AsyncIterator[np.ndarray]:
        """Float32 mono blocks, one per sentence, as each is ready."""

    async def shutdown(self) -> None: ...


@runtime_checkable
class TranscriptionEngine(Protocol):
    #: Languages it can transcribe (["en"] for an English-only model).
    languages: list[str]

    async def start(self) -> None: ...

    async def transcribe(
        self, audio: np.ndarray, language: Optional[str], prompt: Optional[str], temperature: float
    ) -> TranscriptionResult:
        """``audio``: 16 kHz mono float32."""

    async def shutdown(self) -> None: ...


@runtime_checkable
class ImageEngine(Protocol):
    #: Square size the model draws at; the deployment resizes to the requested size.
    native_size: int
    #: Sizes offered, "WxH".
    sizes: list[str]
    #: True when the prompt steers the content (False: it only seeds the generator).
    follows_prompt: bool

    async def start(self) -> None: ...

    async def generate(
        self, prompt: str, n: int, seed: Optional[int], width: int, height: int
    ) -> list[np.ndarray]:
        """``n`` uint8 RGB arrays [H, W, 3] (any size; the deployment resizes)."""

    async def shutdown(self) -> None: ...


def split_sentences(text: str, max_chars: int = 400) -> list[str]:
    """Sentences (ending at . ! ? or a newline), long ones cut at commas/spaces."""
    out: list[str] = []
    current = []
    for ch in text:
        current.append(ch)
        if ch in ".!?\n":
            piece = "".join(current).strip()
            if piece:
                out.append(piece)
            current = []
    tail = "".join(current).strip()
    if tail:
        out.append(tail)
    result: list[str] = []
    for sentence in out:
        while len(sentence) > max_chars:
            cut = max(sentence.rfind(",", 0, max_chars), sentence.rfind(" ", 0, max_chars))
            cut = cut if cut > 0 else max_chars
            result.append(sentence[: cut + 1].strip())
            sentence = sentence[cut + 1 :].strip()
        if sentence:
            result.append(sentence)
    return result

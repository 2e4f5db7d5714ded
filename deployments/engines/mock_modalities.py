"""Deterministic mock engines for embeddings, speech, transcription and images.

No weights, no torch: tests and benchmarks use them. Each output depends only on its
input, so tests can predict it.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import AsyncIterator, Optional, Sequence, Union

import numpy as np

from deployments.engines.modality_base import EmbedOutput, split_sentences
from serve_app.protocol.modalities import TranscriptionResult, TranscriptionSegment
from serve_app.settings.modality import (
    MockEmbeddingsEngineConfig,
    MockImageEngineConfig,
    MockSpeechEngineConfig,
    MockTranscriptionEngineConfig,
)

__all__ = ["MockEmbeddingEngine", "MockSpeechEngine", "MockTranscriptionEngine", "MockImageEngine"]


def _seed_of(data: str) -> int:
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "little")


def _as_text(item: Union[str, list[int]]) -> str:
    return item if isinstance(item, str) else " ".join(str(t) for t in item)


class MockEmbeddingEngine:
    """A unit vector per input from a hash of its words: same words, same vector.

    Inputs that share words are closer than inputs that share none (the vector is the
    normalised sum of per-word vectors), so similarity tests mean something.
    """

    supports_dimensions = True

    def __init__(self, model_id: str, config: MockEmbeddingsEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.dimensions = config.dimensions
        self.max_input_tokens = config.max_input_tokens
        self.batches: list[int] = []  # sizes of the batches run (tests of Serve batching)

    async def start(self) -> None:
        pass

    def count_tokens(self, inputs: Sequence[Union[str, list[int]]]) -> list[int]:
        return [len(x) if isinstance(x, list) else max(1, len(x.split())) for x in inputs]

    def _vector(self, text: str) -> np.ndarray:
        total = np.zeros(self.dimensions, dtype=np.float32)
        for word in text.lower().split() or [""]:
            rng = np.random.default_rng(_seed_of(word))
            total += rng.standard_normal(self.dimensions).astype(np.float32)
        return total / (np.linalg.norm(total) or 1.0)

    async def embed(self, inputs: Sequence[Union[str, list[int]]]) -> EmbedOutput:
        self.batches.append(len(inputs))
        if self.config.delay_ms:
            await asyncio.sleep(self.config.delay_ms / 1000.0)
        vectors = np.stack([self._vector(_as_text(x)) for x in inputs])
        return EmbedOutput(vectors, self.count_tokens(inputs))

    async def shutdown(self) -> None:
        pass


class MockSpeechEngine:
    """One short tone per word, one block per sentence."""

    voices = ["mock"]

    def __init__(self, model_id: str, config: MockSpeechEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.sample_rate = config.sample_rate

    async def start(self) -> None:
        pass

    async def synthesize(self, text: str, voice: str, speed: float) -> AsyncIterator[np.ndarray]:
        n = max(1, int(self.sample_rate * self.config.seconds_per_word / speed))
        t = np.arange(n, dtype=np.float32) / self.sample_rate
        for sentence in split_sentences(text):
            tones = [
                0.3 * np.sin(2 * np.pi * (200 + _seed_of(w) % 600) * t).astype(np.float32)
                for w in sentence.split()
            ]
            await asyncio.sleep(0)
            yield np.concatenate(tones) if tones else np.zeros(n, dtype=np.float32)

    async def shutdown(self) -> None:
        pass


class MockTranscriptionEngine:
    """Answers the configured text with the audio's real duration (the input is decoded)."""

    languages = ["en"]

    def __init__(self, model_id: str, config: MockTranscriptionEngineConfig) -> None:
        self.model_id = model_id
        self.config = config

    async def start(self) -> None:
        pass

    async def transcribe(
        self, audio: np.ndarray, language: Optional[str], prompt: Optional[str], temperature: float
    ) -> TranscriptionResult:
        duration = round(audio.size / 16000.0, 3)
        words = self.config.text.split()
        half = max(1, len(words) // 2)
        segments = [
            TranscriptionSegment(0, 0.0, round(duration / 2, 3), " ".join(words[:half])),
            TranscriptionSegment(1, round(duration / 2, 3), duration, " ".join(words[half:])),
        ]
        segments = [s for s in segments if s.text]
        return TranscriptionResult(self.config.text, language or "en", duration, segments)

    async def shutdown(self) -> None:
        pass


class MockImageEngine:
    """A solid colour from a hash of the prompt and seed."""

    follows_prompt = False

    def __init__(self, model_id: str, config: MockImageEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.native_size = config.native_size
        self.sizes = list(config.sizes)

    async def start(self) -> None:
        pass

    async def generate(
        self, prompt: str, n: int, seed: Optional[int], width: int, height: int
    ) -> list[np.ndarray]:
        out = []
        for i in range(n):
            h = hashlib.blake2b(f"{seed}\x00{prompt}\x00{i}".encode(), digest_size=3).digest()
            img = np.empty((self.native_size, self.native_size, 3), dtype=np.uint8)
            img[:] = np.frombuffer(h, dtype=np.uint8)
            out.append(img)
        return out

    async def shutdown(self) -> None:
        pass

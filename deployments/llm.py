"""The text model deployment: a plain class over one :class:`TextEngine`.

Serve's decorator is applied by the app builder (``serve_app.build``), so this class is
usable and testable without Ray. One instance serves one configured model id. Start,
unload/load, health and the engine registry come from :class:`~deployments.lifecycle.
EngineHost`, as for every other modality.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any, AsyncGenerator, Optional

from deployments.adapter_files import base_names, inspect_adapter, scan_adapter_folder
from deployments.adapters import AdapterSlots, LocalMultiplexer
from deployments.engines.base import TextEngine
from deployments.lifecycle import EngineHost
from serve_app.errors import InferenceFailed, InvalidRequest, TroupeError
from serve_app.protocol.internal import (
    ChunkJoiner,
    EngineFinishReason,
    EngineOutput,
    GenerationRequest,
    TextChunk,
    WireFinishReason,
)
from serve_app.settings import ModelConfig
from serve_app.tracing import (
    ATTR_FINISH_REASONS,
    ATTR_INPUT_TOKENS,
    ATTR_MODEL,
    ATTR_OUTPUT_TOKENS,
    ATTR_REQUEST_ID,
    Span,
    SpanKind,
    end_span,
    extract_context,
    start_span,
)

__all__ = ["LLMDeployment"]

logger = logging.getLogger("troupe.llm")

_WIRE_FINISH: dict[EngineFinishReason, WireFinishReason] = {
    "stop": "stop", "length": "length", "abort": "cancelled", "tool_calls": "tool_calls",
}


def _to_chunk(
    out: EngineOutput, completion: int, adapter_load_ms: Optional[float] = None,
    replica: Optional[str] = None,
) -> TextChunk:
    """The wire chunk of one engine output; the final one carries the exact usage (and,
    for LoRA requests, the adapter's load wait and the replica that served it)."""
    if out.finish_reason is None:
        chunk = TextChunk(out.text, out.num_tokens, None, out.prompt_tokens)
    else:
        chunk = TextChunk(
            out.text,
            out.num_tokens,
            _WIRE_FINISH[out.finish_reason],
            out.prompt_tokens,
            completion,
            stop_sequence=out.stop_sequence,
            cached_tokens=out.cached_tokens,
            adapter_load_ms=adapter_load_ms,
            replica=replica,
        )
    chunk.logprobs, chunk.tool_calls = out.logprobs, out.tool_calls
    chunk.prompt_logprobs = out.prompt_logprobs
    return chunk


def _open_spans(request: GenerationRequest, model_id: str) -> tuple[Span, Span]:
    """Start "deployment.stream" (a child of the gateway's span) and "engine.generate"."""
    attributes = {ATTR_MODEL: model_id, ATTR_REQUEST_ID: request.request_id}
    span = start_span(
        "deployment.stream",
        parent=extract_context(request.trace_context),
        kind=SpanKind.SERVER,
        attributes=attributes,
    )
    return span, start_span("engine.generate", parent=span, attributes=attributes)


def _end_spans(
    span: Span,
    engine_span: Span,
    failure: Optional[BaseException],
    prompt_tokens: int,
    completion: int,
    finish: Optional[str],
) -> None:
    """End "engine.generate" (with the token usage) and "deployment.stream"."""
    usage: dict[str, Any] = {
        ATTR_INPUT_TOKENS: prompt_tokens, ATTR_OUTPUT_TOKENS: completion,
    }
    if finish is not None:
        usage[ATTR_FINISH_REASONS] = (finish,)
    end_span(engine_span, failure, usage)
    end_span(span, failure)


class LLMDeployment(EngineHost):
    """Serves one text model: streams :class:`TextChunk` and counts tokens.

    Args:
        model: the model's :class:`ModelConfig` (or its dict form, as Serve passes args).
        engine: an engine instance to use instead of building one from config (tests).
    """

    engine: TextEngine

    def __init__(self, model: ModelConfig | dict[str, Any], engine: Optional[TextEngine] = None):
        super().__init__(model, engine)
        #: Who served a request (shown to clients); the builder sets Serve's replica id.
        self.replica_id = f"pid-{os.getpid()}"
        self.adapters = self._adapter_slots()  # LoRA adapters (issue 19); None: none served

    # ---------------------------------------------------------- adapters (issue 19)

    def _adapter_slots(self) -> Optional[AdapterSlots]:
        settings = self.model.adapters
        if settings is None:
            return None
        paths = {**(scan_adapter_folder(settings.folder) if settings.folder else {}),
                 **settings.paths}
        names = base_names(self.model)

        def check(adapter_id: str, path: str) -> None:
            inspect_adapter(path, settings.max_rank, names, adapter_id)

        slots = AdapterSlots(lambda: self.engine, paths, check)
        slots.get = LocalMultiplexer(slots.load, settings.max_loaded)
        return slots

    async def _ensure_started(self) -> None:
        """Start the engine; then put back the adapters a reload dropped (a fresh engine
        after unload/load) and load the configured ``preload`` ones."""
        was_started = self._started
        await super()._ensure_started()
        if was_started or not self._started or self.adapters is None:
            return
        for adapter_id in sorted(self.adapters.loaded):
            await self.adapters.engine().load_adapter(adapter_id, self.adapters.paths[adapter_id])
        for adapter_id in self.model.adapters.preload if self.model.adapters else ():
            await self.adapters.get(adapter_id)

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

    async def _release_adapter(self, request: GenerationRequest) -> None:
        if request.adapter is not None and self.adapters is not None:
            await self.adapters.release(request.adapter)

    def _limit(self, request: GenerationRequest) -> GenerationRequest:
        if request.sampling.default_max_tokens is None:
            request.sampling.default_max_tokens = self.model.default_max_tokens
        return request

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[TextChunk, None]:
        """Stream deltas; the last chunk has ``finish_reason`` and exact usage.

        Cancelling the caller (a disconnected client, a WebSocket ``cancel``) closes
        this generator, which closes the engine's stream and aborts the request.
        Traced as "deployment.stream" (a child of the gateway's span, from
        ``request.trace_context``) around "engine.generate".
        """
        queue_ms = self.queue_ms(request.dispatched_at)
        engine = await self._ready_engine()
        cold_start = bool(request.dispatched_at) and request.dispatched_at < (self._ready_at or 0)
        self._limit(request)
        adapter_load_ms = await self._acquire_adapter(request)
        self._served += 1
        completion = 0
        prompt_tokens = 0
        finish: Optional[str] = None
        failure: Optional[BaseException] = None
        span, engine_span = _open_spans(request, self.model.id)
        outputs = engine.generate(request)
        try:
            async for out in outputs:
                completion += out.num_tokens
                prompt_tokens = out.prompt_tokens
                chunk = _to_chunk(out, completion, adapter_load_ms, self.replica_id)
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
            failure = self._engine_crash(exc, request)
            raise failure from None
        finally:
            try:
                await outputs.aclose()
            finally:
                await self._release_adapter(request)
                _end_spans(span, engine_span, failure, prompt_tokens, completion, finish)

    def _engine_crash(self, exc: Exception, request: GenerationRequest) -> InferenceFailed:
        """Log an engine's unexpected error (with its traceback) and name it for the client."""
        logger.exception("engine error on model %s request %s", self.model.id, request.request_id)
        return InferenceFailed(
            f"Model {self.model.id!r} failed while generating: {type(exc).__name__}. "
            "The request was not completed; retry it, and report it if it repeats.",
            details={"exception": type(exc).__name__},
        )

    async def complete(self, request: GenerationRequest) -> TextChunk:
        """Run to completion; returns one chunk with the whole text and usage."""
        joiner = ChunkJoiner()
        queue_ms = None
        cold_start = False
        stream = self.stream(request)
        try:
            async for chunk in stream:
                joiner.add(chunk)
                if chunk.queue_ms is not None:
                    queue_ms = chunk.queue_ms
                    cold_start = chunk.cold_start
                if chunk.finish_reason is not None:
                    return joiner.joined(chunk, queue_ms, cold_start)
        finally:
            await stream.aclose()
        raise InferenceFailed("stream ended without a final chunk")  # stream() raises first

    def stats(self) -> dict[str, Any]:
        """Engine-side truth for /health: what this replica's engine is working on."""
        engine = self.engine
        out = {
            "model": self.model.id,
            "active_requests": engine.active_requests() if engine is not None else 0,
            "served_requests": self._served,
            "context_length": engine.context_length if engine is not None else None,
            "engine": self.model.engine.type,
            "started": self._started,
            "pid": os.getpid(),
            **({"replica": self.replica_id, "adapters": self.adapters.stats()}
               if self.adapters is not None else {}),
            **({"remote": engine.stats()} if hasattr(engine, "stats") else {}),
            # weights on disk, for GET /models (engines that know it set ``size_bytes``)
            **({"size_bytes": engine.size_bytes} if hasattr(engine, "size_bytes") else {}),
            **({"queue": engine.queue_stats()} if hasattr(engine, "queue_stats") else {}),
        }
        if engine is None:
            out["engine_loaded"] = False
        return out

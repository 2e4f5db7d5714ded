"""GatewayCore: everything the routes share.

Routes parse and encode; the core resolves model ids (404, a key's scope), checks that a
model serves the route's modality and is loaded, and hands the request to its two
components: the :class:`~serve_app.gateway.dispatch.Dispatcher` (the only code that calls
model handles: timeouts, cancellation, error translation, metering) and
:class:`~serve_app.gateway.model_state.ModelStates` (load/unload and its persisted state).
It also reports engine-side health.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from typing import Any, AsyncGenerator, Callable, Optional

from serve_app.errors import InvalidRequest, ModelNotFound, TroupeError
from serve_app.gateway.adapters import AdapterCatalog
from serve_app.gateway.deadline import complete_with_deadline, stream_with_deadline
from serve_app.gateway.dispatch import Dispatcher
from serve_app.gateway.metering import RequestInfo, RequestMeter
from serve_app.gateway.modalities import (
    MODALITY_CAPABILITIES,
    MODALITY_NOUN,
    MODALITY_ROUTE,
    modality_card,
)
from serve_app.gateway.model_state import ModelStateBackend, ModelStates
from serve_app.policies.context import authorize_model
from serve_app.pricing import PriceTable
from serve_app.protocol.internal import (
    ChatMessage,
    GenerationRequest,
    SamplingParams,
    TextChunk,
)
from serve_app.protocol.metrics import RequestEvent
from serve_app.protocol.modalities import (
    AudioChunk,
    EmbeddingRequest,
    EmbeddingResult,
    ImageRequest,
    ImageResult,
    SpeechRequest,
    TranscriptionRequest,
    TranscriptionResult,
)
from serve_app.settings import ModelConfig, TroupeSettings
from serve_app.tracing import inject_context

__all__ = ["GatewayCore", "VERSION"]

logger = logging.getLogger("troupe.gateway")

VERSION = "0.1.0"


def _router_replicas(handle: Any) -> Optional[int]:
    """Running replicas the handle's router knows of (Serve internals; None: unknown).

    Lets /health tell a model scaled to zero without sending it a request, which would
    wake it up again (Serve scales from zero on any queued request).
    """
    inner = getattr(getattr(handle, "_router", None), "_asyncio_router", None)
    if inner is None:
        return None
    request_router = getattr(inner, "_request_router", None)
    if request_router is not None:
        replicas = getattr(request_router, "curr_replicas", None)
        return None if replicas is None else len(replicas)
    pending = getattr(inner, "_running_replicas", None)  # before the first request
    return 0 if pending is None else len(pending)


class GatewayCore:
    """Shared gateway state: settings, models, and the dispatcher and model states.

    Args:
        settings: the validated settings tree.
        handles: model id -> DeploymentHandle of that model's deployment (or any object
            with the same ``.stream``/``.complete``/``.stats`` ``remote`` surface).
        record: where finished-request events go (the metrics recorder's ``record``).
        gauge: where the in-flight gauges go.
        model_state: where load/unload state persists (default: in memory).
    """

    def __init__(
        self,
        settings: TroupeSettings,
        handles: dict[str, Any],
        record: Optional[Callable[[RequestEvent], None]] = None,
        gauge: Optional[Callable[[str, dict[str, str], float], None]] = None,
        model_state: Optional[ModelStateBackend] = None,
    ) -> None:
        self.settings = settings
        self.models: dict[str, ModelConfig] = {m.id: m for m in settings.models}
        #: The only caller of model handles (calls, streams, in-flight, metering).
        self.dispatcher = Dispatcher(settings, handles, record, gauge)
        #: Load/unload state of the models (serve_app/gateway/model_state.py).
        self.model_states = ModelStates(self.models, self.dispatcher, model_state)
        #: LoRA adapters per base model (issue 19); the builder gives it the store.
        self.adapters = AdapterCatalog(self.models)
        self.adapters.changes = lambda: self.model_states.backend  # replicas announce changes
        self.dispatcher.route_handle = self.adapters.handle_for
        #: The same price table the metrics actor uses (WebSocket ``complete`` costs).
        self.prices = PriceTable.from_models(settings.models)
        self.started_at = time.time()
        self._logged_unknown: set[tuple[str, str]] = set()

    # -------------------------------------------------------- component state

    @property
    def in_flight(self) -> int:
        """Requests this replica has sent to models and not finished."""
        return self.dispatcher.in_flight

    @property
    def record(self) -> Optional[Callable[[RequestEvent], None]]:
        """Where finished-request events go."""
        return self.dispatcher.record

    @record.setter
    def record(self, sink: Optional[Callable[[RequestEvent], None]]) -> None:
        self.dispatcher.record = sink

    @property
    def unloaded(self) -> set[str]:
        """Model ids unloaded on purpose."""
        return self.model_states.unloaded

    @property
    def model_state(self) -> ModelStateBackend:
        """Where load/unload state persists."""
        return self.model_states.backend

    @model_state.setter
    def model_state(self, backend: ModelStateBackend) -> None:
        self.model_states.backend = backend

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncGenerator[None, None]:
        """The ASGI app's lifespan: follow load/unload state (gateway/model_state.py) and
        adapter registrations made on other gateway replicas (gateway/adapters.py)."""
        async with self.model_states.lifespan(app):
            follow = asyncio.get_running_loop().create_task(self.adapters.follow())
            try:
                yield
            finally:
                follow.cancel()

    # ----------------------------------------------------------------- models

    def resolve(self, model_id: str) -> ModelConfig:
        model = self.models.get(model_id)
        adapter = None if model is not None else self.adapters.split(model_id)  # issue 19
        if adapter is not None:
            model_id, model = adapter.base, self.models[adapter.base]
        if model is None:
            available = ", ".join(sorted(self.models)) or "(none)"
            raise ModelNotFound(
                f"Model {model_id!r} is not served here. Available models: {available}. "
                "List them with GET /v1/models.",
                param="model",
                details={"model": model_id, "available": sorted(self.models)},
            )
        authorize_model(model_id)  # 403 for a key scoped to other models
        return model

    def capabilities(self, model: ModelConfig) -> list[str]:
        return list(MODALITY_CAPABILITIES[model.modality]) + (["vision"] if model.vision else [])

    def modality_card(self, model: ModelConfig) -> dict[str, Any]:
        """Extra /models fields of a non-text model."""
        return modality_card(model)

    def admit(self, model_id: str, modality: str, route: str) -> ModelConfig:
        """Resolve ``model_id`` and check it serves ``modality`` and is loaded."""
        model = self.resolve(model_id)
        if model.modality != modality:
            need = MODALITY_NOUN[modality]
            fitting = sorted(m.id for m in self.models.values() if m.modality == modality)
            raise InvalidRequest(
                f"Model {model_id!r} is a {MODALITY_NOUN[model.modality]} model "
                f"(capabilities: {', '.join(self.capabilities(model))}); {route} needs a "
                f"{need} model"
                + (f", e.g. {', '.join(fitting)}" if fitting else " (none is configured here)")
                + f". {model_id!r} is served by {MODALITY_ROUTE[model.modality]}.",
                param="model",
                details={"model": model_id, "modality": model.modality, "needs": need,
                         "models": fitting},
            )
        self.model_states.check_loaded(model_id)
        return model

    def note_unknown_fields(self, route: str, names: list[str]) -> None:
        """Log request fields we ignore, once per (route, field) so logs stay readable."""
        if not names or not self.settings.log_unknown_fields:
            return
        fresh = [n for n in names if (route, n) not in self._logged_unknown]
        if fresh:
            self._logged_unknown.update((route, n) for n in fresh)
            logger.info("ignoring unknown request fields on %s: %s", route, ", ".join(fresh))

    # ---------------------------------------------------------------- requests

    @staticmethod
    def build_request(
        request_id: str,
        *,
        messages: Optional[list] = None,
        prompt: Optional[str] = None,
        max_tokens: Optional[int] = None,
        temperature: Optional[float] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        stop: tuple[str, ...] = (),
    ) -> GenerationRequest:
        """Translate any API family's fields into the internal request.

        The current span (the request's, opened by ``TracingMiddleware`` or the WebSocket
        session) becomes the parent of the model deployment's spans.
        """
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if temperature is None else temperature,
            top_p=1.0 if top_p is None else top_p,
            seed=seed,
            stop=stop,
        )
        msgs = None
        if messages is not None:
            msgs = [ChatMessage(m.role, m.text()) for m in messages]
        return GenerationRequest(
            request_id, sampling, msgs, prompt, trace_context=inject_context()
        )

    def check_n(self, n: Optional[int]) -> None:
        if n not in (None, 1):
            raise InvalidRequest(
                f"n={n} is not supported: this gateway returns one choice per request. "
                "Send n=1 (or omit it) and issue several requests for several samples.",
                param="n",
            )

    def reject(self, route: str, error: TroupeError, request_id: str) -> None:
        """Account for a request refused before it reached a model (bad input, 404...)."""
        self.dispatcher.reject(route, error, request_id)

    async def complete(
        self, model_id: str, request: GenerationRequest, info: RequestInfo
    ) -> TextChunk:
        """Run a request to completion on the model's deployment."""
        model_id = self.adapters.route(model_id, request)  # "<base>:<adapter>" -> base
        self.admit(model_id, "text", info.route)
        if request.start_within_s is not None:  # flex first, standard after the window
            return await complete_with_deadline(self, model_id, request, info)
        if request.service_tier is not None and info.tier == "default":
            info = dataclasses.replace(info, tier=request.service_tier)
        return await self.dispatcher.call(model_id, "complete", request, info,
                                          on_result=RequestMeter.finished)

    async def stream(
        self, model_id: str, request: GenerationRequest, info: RequestInfo
    ) -> AsyncGenerator[TextChunk, None]:
        """Stream a request's chunks; closing this generator cancels the remote work."""
        model_id = self.adapters.route(model_id, request)  # "<base>:<adapter>" -> base
        self.admit(model_id, "text", info.route)
        if request.start_within_s is not None:  # flex first, standard after the window
            async with contextlib.aclosing(
                stream_with_deadline(self, model_id, request, info)
            ) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        if request.service_tier is not None and info.tier == "default":
            info = dataclasses.replace(info, tier=request.service_tier)

        def on_chunk(meter: RequestMeter, chunk: TextChunk) -> bool:
            meter.chunk(chunk)
            return chunk.finish_reason is not None

        async with contextlib.aclosing(
            self.dispatcher.stream(model_id, "stream", request, info, on_chunk)
        ) as chunks:
            async for chunk in chunks:
                yield chunk


    # ------------------------------------------------------------ modalities

    async def embed(self, model_id: str, request: EmbeddingRequest,
                    info: RequestInfo) -> EmbeddingResult:
        def usage(meter: RequestMeter, result: EmbeddingResult) -> None:
            meter.prompt_tokens = result.prompt_tokens
            meter.queue_ms = result.queue_ms

        return await self.dispatcher.call(model_id, "embed", request, info, usage,
                                          merger=self.dispatcher.embed_merger(model_id))

    def merge_stats(self) -> dict[str, dict[str, int]]:
        """Merged calls per embeddings model on this replica (calls, requests, largest)."""
        return self.dispatcher.merge_stats()

    async def transcribe(self, model_id: str, request: TranscriptionRequest,
                         info: RequestInfo) -> TranscriptionResult:
        return await self.dispatcher.call(model_id, "transcribe", request, info)

    async def generate_images(self, model_id: str, request: ImageRequest,
                              info: RequestInfo) -> ImageResult:
        return await self.dispatcher.call(model_id, "generate", request, info)

    async def speak(self, model_id: str, request: SpeechRequest,
                    info: RequestInfo) -> AsyncGenerator[AudioChunk, None]:
        """Stream encoded audio; closing this generator cancels the synthesis."""

        def on_chunk(meter: RequestMeter, chunk: AudioChunk) -> bool:
            if meter.ttft_ms is None:  # time to first audio
                meter.ttft_ms = (time.perf_counter() - meter.started) * 1000.0
            if chunk.last:
                meter.finish_reason = "stop"
            return chunk.last

        async with contextlib.aclosing(
            self.dispatcher.stream(model_id, "synthesize", request, info, on_chunk, "no audio")
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    async def voices(self, model_id: str) -> dict[str, Any]:
        return await self.dispatcher.control(model_id, "voices")

    # ------------------------------------------------------------ load / unload

    async def unload_model(self, model_id: str) -> dict[str, Any]:
        """Mark unloaded (requests get 409 at once), then free the engine."""
        return await self.model_states.unload(self.resolve(model_id))

    async def load_model(self, model_id: str) -> dict[str, Any]:
        """Start the engine again, then accept requests."""
        return await self.model_states.load(self.resolve(model_id))

    async def refresh_model_state(self) -> None:
        """Adopt the persisted load state (another gateway replica, or a redeploy)."""
        await self.model_states.refresh()

    # ------------------------------------------------------------------ health

    async def model_stats(self) -> dict[str, dict[str, Any]]:
        """Ask every model deployment for its engine's counters (bounded wait)."""
        timeout = self.settings.gateway.health_timeout_s

        async def one(model_id: str) -> tuple[str, dict[str, Any]]:
            if model_id in self.unloaded:  # unloaded on purpose: its replicas may be gone
                return model_id, {"status": "unloaded", "active_requests": 0}
            autoscaling = self.models[model_id].deployment.autoscaling
            if (
                autoscaling is not None
                and autoscaling.min_replicas == 0
                and _router_replicas(self.dispatcher.handles[model_id]) == 0
            ):
                return model_id, {"status": "scaled_to_zero", "active_requests": 0}
            response = self.dispatcher.handles[model_id].stats.remote()
            try:
                async with asyncio.timeout(timeout):
                    return model_id, {"status": "ok", **(await response)}
            except TimeoutError:
                response.cancel()
                return model_id, {"status": "unavailable", "reason": f"no answer in {timeout}s"}
            except Exception as exc:  # a dead or starting replica must not fail /health
                return model_id, {"status": "unavailable", "reason": type(exc).__name__}

        pairs = await asyncio.gather(*(one(mid) for mid in self.models))
        return dict(pairs)

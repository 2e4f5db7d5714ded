"""The gateway's calls to the non-text model deployments, and model load/unload state.

:class:`ModalityCalls` is mixed into :class:`serve_app.gateway.core.GatewayCore`: it checks that a
model serves the route's modality and is loaded, and calls the model's deployment through
``GatewayCore.call_model`` / ``stream_model``, with the same in-flight counts, timeouts,
metering and error translation as text. Concurrent embedding requests are merged into
batch calls (:class:`serve_app.gateway.coalesce.Coalescer`).

Load/unload state lives in a :class:`ModelStateBackend`: in memory (tests, one process)
or the named :class:`actors.model_state.ModelStateActor`, which persists it so a redeploy
of the same config keeps unloaded models unloaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from typing import Any, AsyncIterator, Optional, Protocol

from actors.model_state import ModelStateActor
from serve_app.gateway.coalesce import Coalescer
from serve_app.settings import ModelConfig
from serve_app.errors import InvalidRequest, ModelNotLoaded, Timeout
from serve_app.gateway.metering import RequestInfo, RequestMeter
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

#: Longest wait in POST /models/{id}/load for the model's replicas to start and load.
LOAD_TIMEOUT_S = 300.0

__all__ = [
    "ModalityCalls",
    "ModelStateBackend",
    "MemoryModelState",
    "MODALITY_CAPABILITIES",
    "MODALITY_NOUN",
]

logger = logging.getLogger("troupe.modalities")

#: Capabilities shown in /models, per modality (text's are in core.py).
MODALITY_CAPABILITIES: dict[str, list[str]] = {
    "embeddings": ["embeddings"],
    "speech": ["text-to-speech", "streaming"],
    "transcription": ["speech-to-text"],
    "image": ["image-generation"],
}
#: The capability a route needs, per modality (also names the model kind in errors).
MODALITY_NOUN = {
    "text": "text-generation",
    "embeddings": "embeddings",
    "speech": "text-to-speech",
    "transcription": "speech-to-text",
    "image": "image-generation",
}
#: A route that serves each modality (for "use this instead" hints).
MODALITY_ROUTE = {
    "text": "POST /v1/chat/completions",
    "embeddings": "POST /v1/embeddings",
    "speech": "POST /v1/audio/speech",
    "transcription": "POST /v1/audio/transcriptions",
    "image": "POST /v1/images/generations",
}


def default_merge_in_flight(model: ModelConfig) -> int:
    """Merged calls one gateway replica keeps running to a model, unless configured.

    Fixed size: 2 per replica (one computing, one waiting). Autoscaled: as many calls as
    the autoscaler's target at full size (``max_replicas * target_ongoing_requests``), so
    Serve still sees the ongoing requests it scales on: below that every request is its
    own call (and the replica's ``@serve.batch`` merges them); merging at the gateway
    takes over once all replicas are at their target.
    """
    scaling = model.deployment.autoscaling
    if scaling is None:
        return 2 * (model.deployment.num_replicas or 1)
    return max(2, scaling.max_replicas * math.ceil(scaling.target_ongoing_requests))


class ModelStateBackend(Protocol):
    """Where load/unload state is kept (model id -> loaded)."""

    async def get_all(self) -> dict[str, bool]: ...

    async def set(self, model_id: str, loaded: bool) -> None: ...

    async def watch(
        self, version: Optional[int], timeout_s: float
    ) -> tuple[int, dict[str, bool]]:
        """Long poll: the state once its version differs from ``version`` (or timeout)."""
        ...


class MemoryModelState:
    """Load state in this process only (tests; a single gateway without Ray)."""

    def __init__(self) -> None:
        self._actor = ModelStateActor(None)  # the same object, without Ray

    @property
    def state(self) -> dict[str, bool]:
        return self._actor.state

    async def get_all(self) -> dict[str, bool]:
        return self._actor.get_all()

    async def set(self, model_id: str, loaded: bool) -> None:
        self._actor.set(model_id, loaded)

    async def watch(
        self, version: Optional[int], timeout_s: float
    ) -> tuple[int, dict[str, bool]]:
        return await self._actor.watch(version, timeout_s)


class ModalityCalls:
    """Mixin of GatewayCore (uses its settings, models, handles, meters and counters)."""

    #: Model ids unloaded by POST /models/{id}/unload (refreshed from the state backend).
    unloaded: set[str]
    model_state: ModelStateBackend

    def _init_modalities(self, model_state: Optional[ModelStateBackend] = None) -> None:
        self.unloaded = set()
        self.model_state = model_state or MemoryModelState()
        #: Per embeddings model: this replica's merger of concurrent requests (None: off).
        self._mergers: dict[str, Optional[Coalescer]] = {}

    # ------------------------------------------------------------------ admission

    def admit(self, model_id: str, modality: str, route: str) -> ModelConfig:
        """Resolve ``model_id`` and check it serves ``modality`` and is loaded."""
        model = self.resolve(model_id)  # type: ignore[attr-defined]
        if model.modality != modality:
            need = MODALITY_NOUN[modality]
            fitting = sorted(m.id for m in self.models.values() if m.modality == modality)  # type: ignore[attr-defined]
            raise InvalidRequest(
                f"Model {model_id!r} is a {MODALITY_NOUN[model.modality]} model "
                f"(capabilities: {', '.join(self.capabilities(model))}); {route} needs a "  # type: ignore[attr-defined]
                f"{need} model"
                + (f", e.g. {', '.join(fitting)}" if fitting else " (none is configured here)")
                + f". {model_id!r} is served by {MODALITY_ROUTE[model.modality]}.",
                param="model",
                details={"model": model_id, "modality": model.modality, "needs": need,
                         "models": fitting},
            )
        self.check_loaded(model_id)
        return model

    def check_loaded(self, model_id: str) -> None:
        if model_id in self.unloaded:
            raise ModelNotLoaded(
                f"Model {model_id!r} is configured but unloaded. Load it with "
                f"POST /models/{model_id}/load (admin), then retry.",
                details={"model": model_id, "load": f"POST /models/{model_id}/load"},
            )

    # ------------------------------------------------------------------ calls

    async def embed(self, model_id: str, request: EmbeddingRequest, info: RequestInfo) -> EmbeddingResult:
        def usage(meter: RequestMeter, result: EmbeddingResult) -> None:
            meter.prompt_tokens = result.prompt_tokens
            meter.queue_ms = result.queue_ms

        return await self.call_model(model_id, "embed", request, info, usage,  # type: ignore[attr-defined]
                                     merger=self._embed_merger(model_id))

    def _embed_merger(self, model_id: str) -> Optional[Coalescer]:
        """This replica's merger of concurrent requests to an embeddings model (None: off).

        One handle call per request costs both sides more CPU than a small model's
        forward pass; merged, a burst of requests costs one call and one forward pass.
        """
        if model_id in self._mergers:
            return self._mergers[model_id]
        model: ModelConfig = self.models[model_id]  # type: ignore[attr-defined]
        in_flight = getattr(model.engine, "merge_in_flight", None)
        if in_flight is None:
            in_flight = default_merge_in_flight(model)
        merger: Optional[Coalescer] = None
        if in_flight > 0:
            from deployments.embeddings import REMOTE_MAX_INPUTS

            handle = self._handles[model_id]  # type: ignore[attr-defined]
            timeout = self.settings.gateway.request_timeout_s  # type: ignore[attr-defined]

            async def call(requests: list[EmbeddingRequest]) -> list[Any]:
                from serve_app.gateway.core import _wait_for_replica

                response = handle.embed_many.remote(requests)
                try:
                    await _wait_for_replica(response, model)
                    async with asyncio.timeout(timeout):
                        return await response
                except BaseException:
                    response.cancel()
                    raise

            merger = Coalescer(
                call,
                max_weight=getattr(model.engine, "max_batch_size", REMOTE_MAX_INPUTS),
                max_in_flight=in_flight,
                weight=lambda r: len(r.inputs),
            )
        self._mergers[model_id] = merger
        return merger

    def merge_stats(self) -> dict[str, dict[str, int]]:
        """Merged calls per embeddings model on this replica (calls, requests, largest)."""
        return {mid: {"calls": m.calls, "requests": m.items, "largest": m.largest}
                for mid, m in self._mergers.items() if m is not None}

    async def transcribe(self, model_id: str, request: TranscriptionRequest,
                         info: RequestInfo) -> TranscriptionResult:
        return await self.call_model(model_id, "transcribe", request, info)  # type: ignore[attr-defined]

    async def generate_images(self, model_id: str, request: ImageRequest,
                              info: RequestInfo) -> ImageResult:
        return await self.call_model(model_id, "generate", request, info)  # type: ignore[attr-defined]

    async def speak(self, model_id: str, request: SpeechRequest,
                    info: RequestInfo) -> AsyncIterator[AudioChunk]:
        """Stream encoded audio; closing this generator cancels the synthesis."""

        def on_chunk(meter: RequestMeter, chunk: AudioChunk) -> bool:
            if meter.ttft_ms is None:  # time to first audio
                meter.ttft_ms = (time.perf_counter() - meter.started) * 1000.0
            if chunk.last:
                meter.finish_reason = "stop"
            return chunk.last

        async with contextlib.aclosing(
            self.stream_model(model_id, "synthesize", request, info, on_chunk, "no audio")  # type: ignore[attr-defined]
        ) as chunks:
            async for chunk in chunks:
                yield chunk

    async def voices(self, model_id: str) -> dict[str, Any]:
        from serve_app.gateway.core import _translate

        try:
            return await self._handles[model_id].voices.remote()  # type: ignore[attr-defined]
        except Exception as exc:
            raise _translate(exc, model_id) from None

    # ------------------------------------------------------------ load / unload

    async def refresh_model_state(self, state: Optional[dict[str, bool]] = None) -> None:
        """Adopt the persisted load state (another gateway replica, or a redeploy)."""
        if state is None:
            state = await self.model_state.get_all()
        self.unloaded = {mid for mid, loaded in state.items() if not loaded and mid in self.models}  # type: ignore[attr-defined]

    async def unload_model(self, model_id: str) -> dict[str, Any]:
        """Mark unloaded (requests get 409 at once), then free the replica's engine."""
        from serve_app.gateway.core import _translate

        from serve_app.gateway.replica_scaling import set_replicas

        model = self.resolve(model_id)  # type: ignore[attr-defined]
        await self.model_state.set(model_id, False)
        self.unloaded.add(model_id)
        try:
            freed = await self._handles[model_id].unload.remote()  # type: ignore[attr-defined]
        except Exception as exc:
            raise _translate(exc, model_id) from None
        # Then the replicas themselves go (apps deployed with external_scaler_enabled).
        removed = await set_replicas(model.deployment_name, 0)
        return {"id": model_id, "loaded": False, "memory": freed,
                "replicas": 0 if removed else "kept (engine freed; the app is not externally scaled)"}

    async def load_model(self, model_id: str) -> dict[str, Any]:
        """Start the engine again, then accept requests."""
        from serve_app.gateway.core import _translate

        from serve_app.gateway.replica_scaling import set_replicas

        model = self.resolve(model_id)  # type: ignore[attr-defined]
        # Replicas removed by unload come back first (each loads its engine as it starts).
        await set_replicas(model.deployment_name, model.deployment.num_replicas or 1)
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                info = await self._handles[model_id].load.remote()  # type: ignore[attr-defined]
        except TimeoutError:
            raise Timeout(
                f"Model {model_id!r} did not come back within {LOAD_TIMEOUT_S:.0f}s; "
                "check `troupe status` and retry POST /models/{id}/load.",
                details={"model": model_id},
            ) from None
        except Exception as exc:
            raise _translate(exc, model_id) from None
        await self.model_state.set(model_id, True)
        self.unloaded.discard(model_id)
        return {"id": model_id, "loaded": True, "memory": info}

    async def apply_model_state(self) -> None:
        """At start: replicas of models persisted as unloaded free their engines."""
        await self.refresh_model_state()
        for model_id in sorted(self.unloaded):
            from serve_app.gateway.replica_scaling import set_replicas

            if await set_replicas(self.models[model_id].deployment_name, 0):  # type: ignore[attr-defined]
                continue  # its replicas are gone (externally scaled app)
            try:
                await self._handles[model_id].unload.remote()  # type: ignore[attr-defined]
            except Exception:  # a replica not up yet: the next sync retries
                logger.warning("could not unload %s at start; will retry", model_id)

    def modality_card(self, model: ModelConfig) -> dict[str, Any]:
        """Extra /models fields of a non-text model (what it offers and cannot do)."""
        card: dict[str, Any] = {}
        engine = model.engine
        if model.modality == "image":
            card["sizes"] = list(engine.sizes)  # type: ignore[union-attr]
            card["follows_prompt"] = engine.type == "diffusers"
        return card

    async def start_model_state_sync(
        self, interval_s: float = 2.0, long_poll_s: float = 60.0
    ) -> None:
        """Adopt persisted load state now, then follow it (other replicas' changes) by a
        long poll that answers on a change: no traffic while nothing changes."""

        async def loop() -> None:
            first = True
            version: Optional[int] = None
            while True:
                try:
                    if first:
                        await self.apply_model_state()
                        first = False
                    version, state = await self.model_state.watch(version, long_poll_s)
                    await self.refresh_model_state(state)
                except Exception:  # the state actor restarting: keep the last known state
                    logger.warning("model state sync failed; retrying", exc_info=True)
                    await asyncio.sleep(interval_s)

        self._model_state_task = asyncio.get_running_loop().create_task(loop())

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """The ASGI app's lifespan: follow the model state while the app runs."""
        await self.start_model_state_sync()
        try:
            yield
        finally:
            self._model_state_task.cancel()

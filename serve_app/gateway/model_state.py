"""Model load state: which configured models are unloaded, and load/unload itself.

:class:`ModelStates` (owned by :class:`serve_app.gateway.core.GatewayCore`) keeps the set
of unloaded models, persists changes in a :class:`ModelStateBackend` (in memory for tests
and one process, or the named :class:`actors.model_state.ModelStateActor`, so a redeploy
of the same config keeps unloaded models unloaded), follows other replicas' changes, and
unloads or loads a model's engine through the dispatcher. A model hosted in the gateway
(``run_in: gateway``) goes through the same calls as a Serve deployment.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, AsyncIterator, Optional, Protocol

from actors.model_state import ModelStateActor
from serve_app.errors import ModelNotLoaded, Timeout
from serve_app.gateway.dispatch import Dispatcher
from serve_app.gateway.replica_scaling import set_replicas
from serve_app.settings import ModelConfig

__all__ = ["ModelStates", "ModelStateBackend", "MemoryModelState", "LOAD_TIMEOUT_S"]

logger = logging.getLogger("troupe.modalities")

#: Longest wait in POST /models/{id}/load for the model's replicas to start and load.
LOAD_TIMEOUT_S = 300.0


class ModelStateBackend(Protocol):
    """Where load/unload state is kept (model id -> loaded)."""

    async def get_all(self) -> dict[str, bool]: ...

    async def set(self, model_id: str, loaded: bool) -> None: ...

    async def watch(
        self, version: Optional[int], timeout_s: float
    ) -> tuple[int, dict[str, bool]]:
        """Long poll: the state once its version differs from ``version`` (or timeout)."""
        ...

    async def touch(self) -> None:
        """Answer every watcher without a state change (LoRA adapters changed)."""
        ...


class MemoryModelState:
    """Load state in this process (tests; a single gateway replica), kept in ``path``
    when one is given so a restart or redeploy reads it back."""

    def __init__(self, path: Optional[str] = None) -> None:
        self._actor = ModelStateActor(path)  # the same object, without Ray

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

    async def touch(self) -> None:
        self._actor.touch()


class ModelStates:
    """Load/unload of the configured models, as this gateway replica knows it.

    Args:
        models: model id -> config (the served models).
        dispatcher: calls the models' ``unload``/``load``.
        backend: where the state persists (default: this process's memory).
    """

    def __init__(self, models: dict[str, ModelConfig], dispatcher: Dispatcher,
                 backend: Optional[ModelStateBackend] = None) -> None:
        self.models = models
        self.dispatcher = dispatcher
        self.backend: ModelStateBackend = backend or MemoryModelState()
        #: Model ids unloaded by POST /models/{id}/unload (refreshed from the backend).
        self.unloaded: set[str] = set()
        self._task: Optional[asyncio.Task] = None

    def check_loaded(self, model_id: str) -> None:
        if model_id in self.unloaded:
            raise ModelNotLoaded(
                f"Model {model_id!r} is configured but unloaded. Load it with "
                f"POST /models/{model_id}/load (admin), then retry.",
                details={"model": model_id, "load": f"POST /models/{model_id}/load"},
            )

    async def refresh(self, state: Optional[dict[str, bool]] = None) -> None:
        """Adopt the persisted load state (another gateway replica, or a redeploy)."""
        if state is None:
            state = await self.backend.get_all()
        self.unloaded = {mid for mid, loaded in state.items() if not loaded and mid in self.models}

    async def unload(self, model: ModelConfig) -> dict[str, Any]:
        """Mark unloaded (requests get 409 at once), then free the replica's engine."""
        await self.backend.set(model.id, False)
        self.unloaded.add(model.id)
        freed = await self.dispatcher.control(model.id, "unload")
        # Then the replicas themselves go (apps deployed with external_scaler_enabled).
        if model.run_in == "gateway":
            replicas: Any = "none (hosted in the gateway replica; its engine was freed there)"
        elif await set_replicas(model.deployment_name, 0):
            replicas = 0
        else:
            replicas = "kept (engine freed; the app is not externally scaled)"
        return {"id": model.id, "loaded": False, "memory": freed, "replicas": replicas}

    async def load(self, model: ModelConfig) -> dict[str, Any]:
        """Start the engine again, then accept requests."""
        if model.run_in == "deployment":
            # Replicas removed by unload come back first (each loads its engine as it starts).
            await set_replicas(model.deployment_name, model.deployment.num_replicas or 1)
        try:
            async with asyncio.timeout(LOAD_TIMEOUT_S):
                info = await self.dispatcher.control(model.id, "load")
        except TimeoutError:
            raise Timeout(
                f"Model {model.id!r} did not come back within {LOAD_TIMEOUT_S:.0f}s; "
                "check `troupe status` and retry POST /models/{id}/load.",
                details={"model": model.id},
            ) from None
        await self.backend.set(model.id, True)
        self.unloaded.discard(model.id)
        return {"id": model.id, "loaded": True, "memory": info}

    async def apply(self) -> None:
        """At start: replicas of models persisted as unloaded free their engines."""
        await self.refresh()
        for model_id in sorted(self.unloaded):
            model = self.models[model_id]
            if model.run_in == "deployment" and await set_replicas(model.deployment_name, 0):
                continue  # its replicas are gone (externally scaled app)
            try:
                await self.dispatcher.control(model_id, "unload")
            except Exception:  # a replica not up yet: the next sync retries
                logger.warning("could not unload %s at start; will retry", model_id)

    async def start_sync(self, interval_s: float = 2.0, long_poll_s: float = 60.0) -> None:
        """Adopt persisted load state now, then follow it (other replicas' changes) by a
        long poll that answers on a change: no traffic while nothing changes."""

        async def loop() -> None:
            first = True
            version: Optional[int] = None
            while True:
                try:
                    if first:
                        await self.apply()
                        first = False
                    version, state = await self.backend.watch(version, long_poll_s)
                    await self.refresh(state)
                except Exception:  # the state actor restarting: keep the last known state
                    logger.warning("model state sync failed; retrying", exc_info=True)
                    await asyncio.sleep(interval_s)

        self._task = asyncio.get_running_loop().create_task(loop())

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any) -> AsyncIterator[None]:
        """The ASGI app's lifespan: follow the model state while the app runs."""
        await self.start_sync()
        try:
            yield
        finally:
            if self._task is not None:
                self._task.cancel()

"""The builder's part for the non-text modalities: Serve deployments and model state.

Like ``serve_app.build.app``, this is the only place Ray decorators touch the plain modality
deployment classes. Embeddings get Serve's ``@serve.batch`` here, wrapped around the
plain class's ``embed_batch`` in the replica's constructor, with the model's own batch
size and wait from config.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from serve_app.settings import ModelConfig, TroupeSettings
from serve_app.gateway.modalities import ModelStateBackend

__all__ = ["modality_deployment", "ActorModelState", "model_state_backend"]

_CLASSES = {
    "embeddings": "deployments.embeddings:EmbeddingDeployment",
    "speech": "deployments.speech:SpeechDeployment",
    "transcription": "deployments.transcription:TranscriptionDeployment",
    "image": "deployments.image:ImageDeployment",
}


def _plain_class(modality: str) -> type:
    module, name = _CLASSES[modality].split(":")
    return getattr(importlib.import_module(module), name)


def modality_deployment(model: ModelConfig, setup_replica: Any) -> Any:
    """The Serve deployment (not yet bound) for a non-text model.

    ``setup_replica(tracing, metrics_enabled)`` runs first in each replica (tracing setup).
    """
    from ray import serve

    base = _plain_class(model.modality)

    class ModalityModel(base):  # type: ignore[misc, valid-type]
        async def __init__(  # type: ignore[misc]
            self,
            model_config: dict[str, Any],
            tracing: Optional[dict[str, Any]] = None,
            metrics_enabled: bool = True,
            session: Optional[dict[str, Any]] = None,  # remote engines: the session actor
        ) -> None:
            setup_replica(tracing, metrics_enabled)
            if session is not None:  # a remote embeddings engine: credentials from the actor
                from actors.session import install_session_client
                from serve_app.build.app import _head_node_id

                install_session_client(session, _head_node_id)
            base.__init__(self, model_config)
            if model.modality == "embeddings":
                cfg = self.model.engine
                # Serve's batching across callers: concurrent requests share a forward pass.
                # (remote engines have no batch settings of their own: one upstream call
                # carries up to 16 callers' inputs)
                self.run_one = serve.batch(
                    max_batch_size=getattr(cfg, "max_batch_size", 16),
                    batch_wait_timeout_s=getattr(cfg, "batch_wait_timeout_s", 0.005),
                )(self.embed_batch)
            await self.start()  # load weights before the replica reports healthy

        async def __del__(self) -> None:
            await self.shutdown()

    name = f"{model.modality.capitalize()}Model"
    ModalityModel.__name__ = ModalityModel.__qualname__ = name
    return serve.deployment(ModalityModel).options(
        name=model.deployment_name, **model.deployment.to_serve()
    )


class ActorModelState:
    """Load state in the named ModelStateActor (shared by gateway replicas, persisted)."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle

    async def get_all(self) -> dict[str, bool]:
        return await self.handle.get_all.remote()

    async def set(self, model_id: str, loaded: bool) -> None:
        await self.handle.set.remote(model_id, loaded)

    async def watch(
        self, version: Optional[int], timeout_s: float
    ) -> tuple[int, dict[str, bool]]:
        return await self.handle.watch.remote(version, timeout_s)


def model_state_backend(settings: TroupeSettings) -> ModelStateBackend:
    """The named model-state actor (created by the first gateway replica)."""
    import ray

    from actors.model_state import MODEL_STATE_ACTOR, ModelStateActor, state_file_for
    from actors.names import NAMESPACE
    from serve_app.build.app import _head_node_id

    options: dict[str, Any] = {}
    head = _head_node_id()
    if head is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # Its state file sits on the head node's disk, next to the SQLite ledger.
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=False)
    handle = ray.remote(ModelStateActor).options(
        name=MODEL_STATE_ACTOR,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
        **options,
    ).remote(state_file_for(settings.metrics.resolved_store_url()))
    return ActorModelState(handle)

"""The builder's model replicas: one Serve deployment per configured model, any modality.

Like ``serve_app.build.app``, this is the only place Ray decorators touch the plain
deployment classes (every one an :class:`deployments.lifecycle.EngineHost`). A replica
sets up tracing, installs the session client when its engine calls a remote provider,
builds its engine and starts it before it reports healthy. Embeddings get Serve's
``@serve.batch`` here, around the plain class's ``embed_batch``, with the model's own
batch size and wait from config.
"""

from __future__ import annotations

import importlib
from typing import Any, Optional

from serve_app.build.actors import install_session, span_sink
from serve_app.settings import ModelConfig
from serve_app.tracing import TracingSettings, setup_tracing

__all__ = ["model_deployment", "plain_class"]

_CLASSES = {
    "text": "deployments.llm:LLMDeployment",
    "embeddings": "deployments.embeddings:EmbeddingDeployment",
    "speech": "deployments.speech:SpeechDeployment",
    "transcription": "deployments.transcription:TranscriptionDeployment",
    "image": "deployments.image:ImageDeployment",
}


#: Serve's request router for local text models (``deployment.routing.policy: session``).
_SESSION_ROUTER = "serve_app.build.session_router.SessionAffinityRouter"


def plain_class(modality: str) -> type:
    """The plain (Ray-free) deployment class of a modality."""
    module, name = _CLASSES[modality].split(":")
    return getattr(importlib.import_module(module), name)


def _batch_embeddings(replica: Any) -> None:
    """Serve's batching across callers: concurrent requests share a forward pass.
    (remote engines have no batch settings of their own: one upstream call carries up
    to 16 callers' inputs)"""
    from ray import serve

    cfg = replica.model.engine
    replica.run_one = serve.batch(
        max_batch_size=getattr(cfg, "max_batch_size", 16),
        batch_wait_timeout_s=getattr(cfg, "batch_wait_timeout_s", 0.005),
    )(replica.embed_batch)


def _multiplex_adapters(replica: Any) -> None:
    """Hand a text replica's adapter LRU to Serve's model multiplexing (issue 19), and name
    the replica by its Serve id."""
    from ray import serve

    replica.replica_id = serve.get_replica_context().replica_id.unique_id
    if replica.adapters is not None:
        replica.adapters.get = replica.get_adapter


def _text_replica(replica: type, model: ModelConfig) -> type:
    """The text replica with Serve's ``@serve.multiplexed`` adapter loader: Serve keeps the
    LRU of LoRA adapters per replica and routes a request to one that holds its adapter."""
    from ray import serve

    max_adapters = model.adapters.max_loaded if model.adapters is not None else 1

    class TextModel(replica):
        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def get_adapter(self, adapter_id: str) -> Any:
            """Serve's multiplexed loader: it keeps the LRU and routes by adapter id."""
            return await self.adapters.load(adapter_id)

    return TextModel


def _replica_class(model: ModelConfig) -> type:
    base = plain_class(model.modality)

    class ModelReplica(base):  # type: ignore[misc, valid-type]  # the base is chosen at run time by modality
        async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__; typing wants it sync
            self,
            model_config: dict[str, Any],
            tracing: Optional[dict[str, Any]] = None,
            metrics_enabled: bool = True,
            session: Optional[dict[str, Any]] = None,  # remote engines: the session actor
        ) -> None:
            setup_tracing(TracingSettings.model_validate(tracing or {}), "model",
                          span_sink(metrics_enabled))
            install_session(session)
            super().__init__(model_config)
            if model.modality == "embeddings":
                _batch_embeddings(self)
            if model.modality == "text":
                _multiplex_adapters(self)
            await self.start()  # load weights before the replica reports healthy
            if model.modality == "text" and model.provider == "local" and metrics_enabled:
                from serve_app.build.queue_gauges import start_queue_gauges

                self.queue_gauges = start_queue_gauges(self, model.deployment_name, model.id)

        async def __del__(self) -> None:  # Serve awaits an async __del__ on shutdown
            await self.shutdown()

    replica = _text_replica(ModelReplica, model) if model.modality == "text" else ModelReplica
    name = "TextModel" if model.modality == "text" else f"{model.modality.capitalize()}Model"
    replica.__name__ = replica.__qualname__ = name
    return replica


def _serve_options(model: ModelConfig) -> dict[str, Any]:
    options = model.deployment.to_serve()
    engine = model.engine
    if (engine.type == "vllm" and getattr(engine, "tensor_parallel_size", 1) > 1
            and "placement_group_bundles" not in options):
        # vLLM's Ray workers take the GPUs from the replica's placement group (one bundle
        # per shard, packed on one node); the replica actor itself then holds no GPU.
        from deployments.engines.vllm_engine import placement_bundles

        options["placement_group_bundles"] = placement_bundles(engine)
        options["placement_group_strategy"] = "STRICT_PACK"
        options["ray_actor_options"] = {**options["ray_actor_options"], "num_gpus": 0}
    routing = model.deployment.routing
    dep = model.deployment
    several = (dep.autoscaling.max_replicas if dep.autoscaling else dep.num_replicas or 1) > 1
    # One replica has nothing to choose between: Serve's own router serves it without the
    # session router's key digest and load probe.
    if (model.modality == "text" and model.provider == "local" and routing.policy == "session"
            and several):
        from ray.serve.config import RequestRouterConfig

        options["request_router_config"] = RequestRouterConfig(
            # Ray's stub misreads the field's Union[str, Callable]
            request_router_class=_SESSION_ROUTER,  # type: ignore[arg-type]
            request_router_kwargs={"max_imbalance": routing.max_imbalance},
        )
    return options


def model_deployment(model: ModelConfig) -> Any:
    """The Serve deployment (not yet bound) for one configured model."""
    from ray import serve

    return serve.deployment(_replica_class(model)).options(  # type: ignore[attr-defined]  # Ray's stub: deployment(cls) is a Deployment
        name=model.deployment_name, **_serve_options(model))

"""The app builder: config -> one Serve deployment per model + the Gateway ingress.

``serve run config/local.yaml`` calls :func:`build_app` with the config's ``args``.
Ray decorators are applied here and nowhere else; the deployment classes stay plain.
The FastAPI app is built per replica, inside ``Gateway.__serve_build_asgi_app__``, never
at import, so tests can build many apps in one process.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI

from actors.names import METRICS_ACTOR, NAMESPACE
from serve_app.settings import ModelConfig, TroupeSettings, load_settings
from serve_app.gateway.core import VERSION, GatewayCore
from serve_app.http.plumbing import RequestIdMiddleware, install_error_handlers
from serve_app.routes.anthropic_api import build_anthropic_router
from serve_app.routes.modalities import build_modalities_router


from serve_app.routes.admin import build_admin_router
from serve_app.routes.adapters import build_adapters_router
from serve_app.routes.native import build_native_router
from serve_app.routes.observability import build_observability_router
from serve_app.routes.openai_api import build_openai_router
from serve_app.routes.playground import build_playground_router
from serve_app.routes.responses_api import build_responses_router
from serve_app.routes.websocket import build_ws_router
from serve_app.gateway.voice import build_voice_router
from serve_app.tracing import (
    ActorSpanSink,
    TracingMiddleware,
    TracingSettings,
    setup_tracing,
)

__all__ = ["build_app", "build_fastapi_app", "Gateway", "model_deployment"]

logger = logging.getLogger("troupe.app")


def build_fastapi_app(
    core: GatewayCore, behind_serve_proxy: bool = False, metrics_actor: Any = None,
    session_actor: Any = None,
    policies: Any = None,
) -> Any:
    """The gateway's ASGI app over one core (also usable without Serve, e.g. in tests).

    ``behind_serve_proxy``: adopt the request id Serve's proxy assigned (it also puts it
    on the response); without the proxy the app generates and sets its own.
    ``metrics_actor``: handle of the metrics actor for the observability routes.
    ``policies``: a :class:`~serve_app.policies.layer.PolicyLayer` (auth, rate limits,
    idempotency, admin key routes); None: no policy layer (in-process unit tests).
    """
    app = FastAPI(
        title="Troupe",
        version=VERSION,
        description="Inference gateway on Ray Serve: OpenAI-compatible, REST and WebSocket.",
        docs_url="/docs",
        redoc_url=None,
        lifespan=core.lifespan,  # follows load/unload state (serve_app/gateway/modalities.py)
    )
    install_error_handlers(app, on_rejected=core.reject)
    app.include_router(build_openai_router(core))
    app.include_router(build_responses_router(core))
    app.include_router(build_anthropic_router(core))
    app.include_router(build_native_router(core))
    app.include_router(build_ws_router(core))
    app.include_router(build_observability_router(core, metrics_actor))
    app.include_router(build_modalities_router(core))
    app.include_router(build_voice_router(core))
    app.include_router(build_playground_router())
    app.include_router(build_admin_router(core, lambda: session_actor))
    app.include_router(build_adapters_router(core))  # LoRA adapters (issue 19)
    inner: Any = app
    if policies is not None:
        from serve_app.policies.layer import PolicyMiddleware
        from serve_app.routes.admin_keys import build_admin_keys_router

        app.include_router(build_admin_keys_router(policies))
        if policies.batch is not None:
            from serve_app.routes.batch import build_batch_router

            app.include_router(build_batch_router(policies.batch))
        inner = PolicyMiddleware(app, policies)  # one place for auth, limits, idempotency
    traced_app: Any = TracingMiddleware(inner)
    cors = core.settings.cors
    if cors.allow_origins:
        from starlette.middleware.cors import CORSMiddleware

        traced_app = CORSMiddleware(
            traced_app, allow_origins=list(cors.allow_origins),
            allow_methods=list(cors.allow_methods), allow_headers=list(cors.allow_headers),
            expose_headers=["x-request-id", "retry-after", "x-ratelimit-limit",
                            "x-ratelimit-remaining", "x-ratelimit-reset",
                            "x-ratelimit-reset-after", "idempotent-replayed"],
            max_age=cors.max_age_s,
        )
    # Outermost, so even errors answered by Starlette's last-resort handler carry the id;
    # tracing inside it, so the request span has the id.
    return RequestIdMiddleware(traced_app, trust_upstream_id=behind_serve_proxy)


def _span_sink(metrics_enabled: bool) -> Optional[ActorSpanSink]:
    """Finished spans of this replica go, in batches, to the metrics actor (for /traces)."""
    if not metrics_enabled:
        return None
    return ActorSpanSink(METRICS_ACTOR, namespace=NAMESPACE)


def _head_node_id() -> Optional[str]:
    """The Ray head node's id (it carries the ``node:__internal_head__`` resource)."""
    import ray

    for node in ray.nodes():
        if node.get("Alive") and "node:__internal_head__" in node.get("Resources", {}):
            return node["NodeID"]
    return None


def metrics_actor_handle(settings: TroupeSettings) -> Any:
    """The named, restartable metrics actor: created by the first caller, found by the rest."""
    import ray

    from actors.metrics import MetricsActor
    from serve_app.pricing import overrides_from_models

    metrics = settings.metrics
    store_url = metrics.resolved_store_url()
    options: dict[str, Any] = {}
    head = _head_node_id()
    if head is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # A SQLite ledger is a file on the head node's disk: the actor must run there.
        # With PostgreSQL the head is only preferred.
        soft = not store_url.startswith("sqlite:")
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(head, soft=soft)
    return ray.remote(MetricsActor).options(
        name=METRICS_ACTOR,
        namespace=NAMESPACE,
        lifetime="detached",
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=metrics.actor_num_cpus,
        **options,
    ).remote(
        store_url,
        overrides_from_models(settings.models),
        metrics.histogram_buckets_ms,
        max_traces=settings.tracing.max_traces_kept,
        max_spans_per_trace=settings.tracing.max_spans_per_trace,
        serve_poll_s=metrics.serve_poll_interval_s,
    )


def _serve_bind_host() -> Optional[str]:
    """The host Serve's HTTP proxies bind to (None when it cannot be read)."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # no Serve client here: unknown, so auth stays on
        return None


def quota_actor_handle(settings: TroupeSettings) -> Any:
    """The named quota actor counting rate-limit windows for every gateway replica."""
    import ray

    from actors.quota import QUOTA_ACTOR, QuotaActor

    return ray.remote(QuotaActor).options(
        name=QUOTA_ACTOR, namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
        max_restarts=-1, max_task_retries=-1, num_cpus=settings.limits.actor_num_cpus,
    ).remote()


def policy_layer(settings: TroupeSettings, core: GatewayCore) -> Any:
    """Auth, rate limits and idempotency of one gateway replica (see serve_app.policies)."""
    from serve_app.policies.layer import PolicyLayer
    from serve_app.store import open_store

    # Always created: a key's own limits may apply even when the defaults set none.
    quota = quota_actor_handle(settings)
    store = open_store(settings.metrics.resolved_store_url())
    if hasattr(store, "synchronous"):
        store.synchronous = "NORMAL"  # SQLite: no fsync per idempotency write (see SQLiteStore)
    return PolicyLayer(settings, store, quota, bind_host=_serve_bind_host(),
                       on_rejected=core.reject, core=core)


class Gateway:
    """The ingress deployment: owns a GatewayCore and builds its ASGI app per replica.

    Args:
        settings: the settings tree as a dict (Serve passes plain data).
        handles: model id -> handle of that model's deployment (Serve resolves them).
    """

    def __init__(self, settings: dict[str, Any], handles: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO)
        parsed = TroupeSettings.model_validate(settings)
        self.session_actor = None
        if parsed.credential_envs():
            from actors.session import install_session_client, session_actor_args

            client = install_session_client(session_actor_args(parsed), _head_node_id)
            self.session_actor = client.actor
        self.local_handles = _in_gateway_handles(parsed)
        handles = {**handles, **self.local_handles}
        self.metrics_actor = None
        self.recorder = None
        if parsed.metrics.enabled:
            from actors.recorder import MetricsRecorder, actor_gauge_sink, actor_sink

            self.metrics_actor = metrics_actor_handle(parsed)
            self.recorder = MetricsRecorder(
                actor_sink(self.metrics_actor),
                flush_interval_s=parsed.metrics.flush_interval_s,
                max_batch=parsed.metrics.max_batch,
                max_buffer=parsed.metrics.max_buffer,
                gauge_sink=actor_gauge_sink(self.metrics_actor),
            )
        from serve_app.build.modality import model_state_backend

        self.core = GatewayCore(
            parsed,
            handles,
            record=self.recorder.record if self.recorder else None,
            gauge=self.recorder.set_gauge if self.recorder else None,
            model_state=model_state_backend(parsed),
        )
        setup_tracing(parsed.tracing, "gateway", _span_sink(parsed.metrics.enabled))
        self.policies = policy_layer(parsed, self.core)
        self.core.adapters.store = self.policies.store  # registered adapters persist there

    def __serve_build_asgi_app__(self) -> Any:
        return build_fastapi_app(
            self.core, behind_serve_proxy=True, metrics_actor=self.metrics_actor,
            session_actor=self.session_actor, policies=self.policies,
        )

    async def check_health(self) -> None:
        """Serve's periodic health check; also starts the policy layer's background work
        (key refresh, batch worker) on a replica that has not served a request yet."""
        await self.policies.ready()
        await self.core.adapters.refresh()  # adapters registered on another replica

    async def __del__(self) -> None:  # Serve awaits it on graceful shutdown: flush what is left
        for handle in getattr(self, "local_handles", {}).values():  # in-gateway engines
            await handle.shutdown.remote()
        if self.recorder is not None:
            await self.recorder.close()


def _setup_model_replica(tracing: Optional[dict[str, Any]], metrics_enabled: bool) -> None:
    setup_tracing(TracingSettings.model_validate(tracing or {}), "model", _span_sink(metrics_enabled))


def _in_gateway_handles(settings: TroupeSettings) -> dict[str, Any]:
    """Handles over engines that run inside this gateway replica (``run_in: gateway``)."""
    from deployments.llm import LLMDeployment
    from serve_app.build.local_handle import LocalHandle

    return {
        m.id: LocalHandle(LLMDeployment(m)) for m in settings.models if m.run_in == "gateway"
    }


def _multiplex_adapters(replica: Any) -> None:
    """Hand the replica's adapter LRU to Serve's model multiplexing (issue 19), and name the
    replica by its Serve id."""
    from ray import serve

    replica.replica_id = serve.get_replica_context().replica_id.unique_id
    if replica.adapters is not None:
        replica.adapters.get = replica.get_adapter


def model_deployment(model: ModelConfig):
    """The Serve deployment (not yet bound) for one configured model."""
    from ray import serve

    from deployments.lifecycle import TextLifecycle
    from deployments.llm import LLMDeployment

    if model.modality != "text":
        from serve_app.build.modality import modality_deployment

        return modality_deployment(model, _setup_model_replica)

    max_adapters = model.adapters.max_loaded if model.adapters is not None else 1

    class TextModel(TextLifecycle, LLMDeployment):
        async def __init__(  # type: ignore[misc]
            self,
            model_config: dict[str, Any],
            tracing: Optional[dict[str, Any]] = None,
            metrics_enabled: bool = True,
            session: Optional[dict[str, Any]] = None,
        ) -> None:
            if session is not None:  # a remote engine: credentials from the session actor
                from actors.session import install_session_client

                install_session_client(session, _head_node_id)
            tracing_settings = TracingSettings.model_validate(tracing or {})
            setup_tracing(tracing_settings, "model", _span_sink(metrics_enabled))
            LLMDeployment.__init__(self, model_config)
            _multiplex_adapters(self)
            await self.start()  # load weights before the replica reports healthy

        @serve.multiplexed(max_num_models_per_replica=max_adapters)
        async def get_adapter(self, adapter_id: str) -> Any:
            """Serve's multiplexed loader: it keeps the LRU and routes by adapter id."""
            return await self.adapters.load(adapter_id)

        async def __del__(self) -> None:  # Serve awaits an async __del__ on shutdown
            await self.shutdown()

    TextModel.__name__ = TextModel.__qualname__ = "TextModel"
    options = model.deployment.to_serve()
    engine = model.engine
    if engine.type == "vllm" and engine.tensor_parallel_size > 1 and "placement_group_bundles" not in options:
        # vLLM's Ray workers take the GPUs from the replica's placement group (one bundle
        # per shard, packed on one node); the replica actor itself then holds no GPU.
        from deployments.engines.vllm_engine import placement_bundles

        options["placement_group_bundles"] = placement_bundles(engine)
        options["placement_group_strategy"] = "STRICT_PACK"
        options["ray_actor_options"] = {**options["ray_actor_options"], "num_gpus": 0}
    return serve.deployment(TextModel).options(name=model.deployment_name, **options)


def build_app(args: Optional[dict[str, Any]] = None):
    """Serve application builder (``import_path: serve_app.build.app:build_app``).

    Raises:
        ConfigError: when the config is invalid, naming each bad field's path.
    """
    from ray import serve

    settings = load_settings(args)
    session_args = None
    if settings.credential_envs():
        from actors.session import session_actor_args

        session_args = session_actor_args(settings)
    handles = {
        model.id: model_deployment(model).bind(
            model.model_dump(mode="json", exclude_unset=True),
            settings.tracing.model_dump(mode="json"),
            settings.metrics.enabled,
            session_args if model.provider != "local" else None,
        )
        for model in settings.models
        if model.run_in == "deployment"
    }
    gw = settings.gateway
    gateway = serve.deployment(serve.ingress()(Gateway)).options(
        name="Gateway",
        num_replicas=gw.num_replicas,
        max_ongoing_requests=gw.max_ongoing_requests,
        ray_actor_options=gw.ray_actor_options.to_ray(),
    )
    logger.info(
        "Troupe %s: %d model(s): %s", VERSION, len(settings.models),
        ", ".join(f"{m.id} ({m.engine.type})" for m in settings.models),
    )
    return gateway.bind(settings.model_dump(mode="json", exclude_unset=True), handles)

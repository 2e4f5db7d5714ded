"""The app builder: config -> one Serve deployment per model + the Gateway ingress.

``serve run config/local.yaml`` calls :func:`build_app` with the config's ``args``.
Ray decorators are applied in ``serve_app.build`` and nowhere else (the model replicas
in ``build/replicas.py``, the named actors in ``build/actors.py``); the deployment and
actor classes stay plain.
The FastAPI app is built per replica, inside ``Gateway.__serve_build_asgi_app__``, never
at import, so tests can build many apps in one process.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI

from serve_app.build.actors import (
    in_process_metrics,
    install_session,
    metrics_actor_handle,
    metrics_in_process,
    model_state_backend,
    quota_actor_handle,
    session_actor_args,
    span_sink,
)
from serve_app.build.in_gateway import InGatewayModels
from serve_app.build.replicas import model_deployment
from serve_app.build.uvicorn_tick import tick_from_env
from serve_app.gateway.core import VERSION, GatewayCore
from serve_app.http.plumbing import RequestIdMiddleware, install_error_handlers
from serve_app.routes.adapters import build_adapters_router
from serve_app.routes.admin import build_admin_router
from serve_app.routes.anthropic_api import build_anthropic_router
from serve_app.routes.gemini_api import GeminiPaths, build_gemini_router
from serve_app.routes.gemini_interactions import build_interactions_router
from serve_app.routes.modalities import build_modalities_router
from serve_app.routes.native import build_native_router
from serve_app.routes.observability import build_observability_router
from serve_app.routes.openai_api import build_openai_router
from serve_app.routes.playground import build_playground_router
from serve_app.routes.realtime import build_realtime_router
from serve_app.routes.responses_api import build_responses_router
from serve_app.routes.voice import build_voice_router
from serve_app.routes.websocket import build_ws_router
from serve_app.settings import TroupeSettings, load_settings
from serve_app.store.location import (
    StateLocation,
    legacy_store_note,
    settings_state_location,
)
from serve_app.tracing import TracingMiddleware, setup_tracing

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
        lifespan=core.lifespan,  # follows load/unload state and adapter registrations
    )
    install_error_handlers(app, on_rejected=core.reject)
    for router in (
        build_openai_router(core), build_responses_router(core), build_anthropic_router(core),
        build_native_router(core), build_ws_router(core),
        build_observability_router(core, metrics_actor), build_modalities_router(core),
        build_voice_router(core), build_realtime_router(core, metrics_actor),
        build_playground_router(), build_admin_router(core, lambda: session_actor),
        build_adapters_router(core),  # LoRA adapters (issue 19)
        build_gemini_router(core), build_interactions_router(core),  # Gemini's shapes (issue 16)
    ):
        app.include_router(router)
    inner: Any = app
    if policies is not None:
        from serve_app.policies.layer import PolicyMiddleware
        from serve_app.routes.admin_keys import build_admin_keys_router

        app.include_router(build_admin_keys_router(policies))
        if policies.batch is not None:
            from serve_app.routes.batch import build_batch_router

            app.include_router(build_batch_router(policies.batch))
        inner = PolicyMiddleware(app, policies)  # one place for auth, limits, idempotency
    inner = GeminiPaths(inner)  # google-genai's /v1/models/{m}:method -> /v1beta (before auth)
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


def _serve_bind_host() -> Optional[str]:
    """The host Serve's HTTP proxies bind to (None when it cannot be read)."""
    try:
        from ray.serve.context import _get_global_client

        client = _get_global_client()
        assert client is not None  # it raises instead of returning None unless asked not to
        return client.http_config.host
    except Exception:  # no Serve client here: unknown, so auth stays on
        return None


def policy_layer(settings: TroupeSettings, core: GatewayCore, store_url: str) -> Any:
    """Auth, rate limits and idempotency of one gateway replica (see serve_app.policies)."""
    from serve_app.policies.layer import PolicyLayer
    from serve_app.store import open_store

    # Always created: a key's own limits may apply even when the defaults set none.
    quota = quota_actor_handle(settings)
    store = open_store(store_url)
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

    async def __init__(  # type: ignore[misc]  # Serve awaits an async __init__; typing wants it sync
        self, settings: dict[str, Any], handles: dict[str, Any],
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        tick_from_env()  # before Serve starts this replica's uvicorn (direct ingress)
        parsed = TroupeSettings.model_validate(settings)
        self.state: StateLocation = settings_state_location(parsed)
        logger.info("Troupe %s", self.state.describe())
        note = legacy_store_note(self.state)
        if note is not None:
            logger.warning("Troupe %s", note)
        self.session_actor = None
        if parsed.credential_envs():
            self.session_actor = install_session(session_actor_args(parsed)).actor
        self.in_gateway = InGatewayModels(parsed)
        handles = {**handles, **self.in_gateway.handles}
        self.metrics_actor = None
        self.recorder = None
        if parsed.metrics.enabled:
            from actors.recorder import MetricsRecorder, actor_gauge_sink, actor_sink

            self.metrics_actor = await in_process_metrics(parsed, self.state.store_url) \
                if metrics_in_process(parsed) \
                else metrics_actor_handle(parsed, self.state.store_url)
            self.recorder = MetricsRecorder(
                actor_sink(self.metrics_actor),
                flush_interval_s=parsed.metrics.flush_interval_s,
                max_batch=parsed.metrics.max_batch,
                max_buffer=parsed.metrics.max_buffer,
                gauge_sink=actor_gauge_sink(self.metrics_actor),
            )
        self.core = GatewayCore(
            parsed,
            handles,
            record=self.recorder.record if self.recorder else None,
            gauge=self.recorder.set_gauge if self.recorder else None,
            model_state=model_state_backend(self.state, parsed.gateway.num_replicas),
        )
        setup_tracing(parsed.tracing, "gateway", span_sink(parsed.metrics.enabled,
                                                            self._own_metrics()))
        self.policies = policy_layer(parsed, self.core, self.state.store_url)
        self.core.adapters.store = self.policies.store  # registered adapters persist there
        self.core.adapters.ready = self.policies.ready  # which opens that store
        # Weights load before this replica reports ready, as a model replica's would.
        await self.in_gateway.start(self.metrics_actor)

    def _own_metrics(self) -> Any:
        """The metrics actor when it lives in this process (None: the named Ray actor)."""
        from serve_app.build.local_actor import InProcessActor

        return self.metrics_actor if isinstance(self.metrics_actor, InProcessActor) else None

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
        if hasattr(self, "in_gateway"):
            await self.in_gateway.shutdown()
        if self.recorder is not None:
            await self.recorder.close()
        own = self._own_metrics() if hasattr(self, "metrics_actor") else None
        if own is not None:  # the ledger's store closes with this process's metrics
            await own.target.close()


def build_app(args: Optional[dict[str, Any]] = None):
    """Serve application builder (``import_path: serve_app.build.app:build_app``).

    Raises:
        ConfigError: when the config is invalid, naming each bad field's path.
    """
    from ray import serve

    settings = load_settings(args)
    session_args = None
    if settings.credential_envs():
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
    gateway = serve.deployment(serve.ingress()(Gateway)).options(  # type: ignore[attr-defined]  # Ray's stub: deployment(cls) is a Deployment
        name="Gateway",
        num_replicas=gw.num_replicas,
        max_ongoing_requests=gw.max_ongoing_requests,
        # Its own CPUs plus those of the models computing inside it (run_in: gateway).
        ray_actor_options={**gw.ray_actor_options.to_ray(),
                           "num_cpus": settings.gateway_num_cpus()},
    )
    logger.info(
        "Troupe %s: %d model(s): %s", VERSION, len(settings.models),
        ", ".join(f"{m.id} ({m.engine.type})" for m in settings.models),
    )
    return gateway.bind(settings.model_dump(mode="json", exclude_unset=True), handles)

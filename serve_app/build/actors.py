"""The builder's long-lived actors: metrics, quota, model state, provider credentials.

Each is a named, detached, restartable Ray actor created by the first replica that asks
and found by the rest (``actors.placement.named_actor``, the one helper for all of them).
The actor classes stay plain (``actors/``); their options and arguments are set here.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from actors.names import METRICS_ACTOR, NAMESPACE, SESSION_ACTOR
from actors.placement import head_for_store, named_actor
from serve_app.gateway.model_state import MemoryModelState, ModelStateBackend
from serve_app.settings import TroupeSettings
from serve_app.store.location import StateLocation, app_state_location, config_digest
from serve_app.tracing import ActorSpanSink

__all__ = [
    "ActorModelState",
    "LazyActor",
    "in_process_metrics",
    "metrics_actor_handle",
    "metrics_in_process",
    "model_state_backend",
    "quota_actor_handle",
    "install_session",
    "session_actor_args",
    "session_actor_handle",
    "span_sink",
]


def metrics_actor_handle(settings: TroupeSettings, store_url: str) -> Any:
    """The metrics actor (cost ledger, Prometheus, usage, traces) over ``store_url``."""
    from actors.metrics import MetricsActor
    from serve_app.pricing import overrides_from_models

    metrics = settings.metrics
    return named_actor(
        MetricsActor, METRICS_ACTOR, num_cpus=metrics.actor_num_cpus,
        on_head=head_for_store(store_url),
    ).remote(store_url, overrides_from_models(settings.models), metrics.histogram_buckets_ms,
             **_metrics_options(settings))


def _metrics_options(settings: TroupeSettings) -> dict[str, Any]:
    return {"max_traces": settings.tracing.max_traces_kept,
            "max_spans_per_trace": settings.tracing.max_spans_per_trace,
            "serve_poll_s": settings.metrics.serve_poll_interval_s}


def metrics_in_process(settings: TroupeSettings) -> bool:
    """Whether the metrics actor can live in the gateway's own process: one gateway replica,
    every model hosted in it (no model replica sends events, spans or queue gauges), and
    a one-node Ray (the ledger file is on this machine). ``make run``'s case."""
    return (settings.metrics.enabled and settings.gateway.num_replicas == 1
            and all(m.run_in == "gateway" for m in settings.models) and _one_node())


async def in_process_metrics(settings: TroupeSettings, store_url: str) -> Any:
    """The metrics actor as an object of this process (see :func:`metrics_in_process`),
    started, behind the handle surface its callers use."""
    from actors.metrics import MetricsActor
    from serve_app.build.local_actor import InProcessActor
    from serve_app.pricing import overrides_from_models

    actor = MetricsActor(store_url, overrides_from_models(settings.models),
                         settings.metrics.histogram_buckets_ms, **_metrics_options(settings))
    await actor.start()
    return InProcessActor(actor)


class LazyActor:
    """A named actor's handle, got or created on first attribute access.

    An idle Ray actor is a process that still costs about 1% of a core (Ray's own 10 ms
    signal check in its main thread; issue 20), so an actor that may never be needed
    (the quota actor of a gateway whose keys have no limits) starts when first used.
    """

    def __init__(self, create: Callable[[], Any]) -> None:
        self._create: Optional[Callable[[], Any]] = create
        self._handle: Any = None

    @property
    def started(self) -> bool:
        return self._create is None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._create is not None:
            self._handle, self._create = self._create(), None
        return getattr(self._handle, name)


def quota_actor_handle(settings: TroupeSettings) -> LazyActor:
    """The quota actor counting rate-limit windows for every gateway replica, started
    once limits apply to some key (``RateLimiter.prepare``; none while no key has them)."""
    from actors.quota import QUOTA_ACTOR, QuotaActor

    return LazyActor(lambda: named_actor(
        QuotaActor, QUOTA_ACTOR, num_cpus=settings.limits.actor_num_cpus).remote())


class ActorModelState:
    """Load state in the named ModelStateActor (shared by gateway replicas, persisted in
    ``path``, this app's own file: the actor may serve several apps of one cluster)."""

    def __init__(self, handle: Any, path: Optional[str] = None) -> None:
        self.handle = handle
        self.path = path

    async def get_all(self) -> dict[str, bool]:
        return await self.handle.get_all.remote(self.path)

    async def set(self, model_id: str, loaded: bool) -> None:
        await self.handle.set.remote(model_id, loaded, self.path)

    async def watch(
        self, version: Optional[int], timeout_s: float
    ) -> tuple[int, dict[str, bool]]:
        return await self.handle.watch.remote(version, timeout_s, self.path)

    async def touch(self) -> None:
        await self.handle.touch.remote()


def _one_node() -> bool:
    import ray

    return sum(1 for node in ray.nodes() if node.get("Alive")) == 1


def model_state_backend(location: StateLocation, gateway_replicas: int) -> ModelStateBackend:
    """The model-state actor; its files sit in the apps' state folders, on the head node.

    One gateway replica on a one-node Ray (``make run``) has no one to share the state
    with and the file is on this machine's disk: it keeps the state in its own process,
    one idle Ray process (about 1% of a core) fewer.
    """
    from actors.model_state import MODEL_STATE_ACTOR, ModelStateActor

    if gateway_replicas == 1 and _one_node():
        return MemoryModelState(location.model_state_file)

    handle = named_actor(
        ModelStateActor, MODEL_STATE_ACTOR, num_cpus=0, on_head="required"
    ).remote(location.model_state_file)
    return ActorModelState(handle, location.model_state_file)


def session_actor_args(settings: TroupeSettings) -> dict[str, Any]:
    """What a replica needs to find or create the session actor (plain data for Serve).

    ``store_url`` is None unless the config names a store: each replica then resolves its
    app's own state location (``serve_app.store.location``) from ``config_digest``.
    """
    sess = settings.session
    return {
        "envs": settings.credential_envs(),
        "secrets_file": sess.secrets_file,
        "store_url": sess.store_url or settings.metrics.store_url,
        "config_digest": config_digest(settings.models),
        "poll_interval_s": sess.poll_interval_s,
        "long_poll_s": sess.long_poll_s,
        "num_cpus": sess.actor_num_cpus,
        "name": sess.actor_name,
    }


def session_actor_handle(args: Mapping[str, Any]) -> Any:
    """The session actor (provider credentials), pinned to the head node when its store
    is a SQLite file there."""
    from actors.session import SessionActor

    store_url = args["store_url"] or app_state_location(None, args["config_digest"]).store_url
    return named_actor(
        SessionActor, args.get("name") or SESSION_ACTOR, num_cpus=args["num_cpus"],
        on_head=head_for_store(store_url), max_concurrency=1000,
    ).remote(args["envs"], args["secrets_file"], store_url, args["poll_interval_s"])


def install_session(args: Optional[Mapping[str, Any]]) -> Any:
    """In a replica that calls remote providers: credentials from the session actor's
    snapshots (``args``: :func:`session_actor_args`); None: nothing to install.

    Returns the process's :class:`actors.session.CredentialClient` (one per process).
    """
    if args is None:
        return None
    from actors.session import (
        CredentialClient,
        credential_source,
        install_credential_source,
    )

    source = credential_source()
    if not isinstance(source, CredentialClient):
        source = CredentialClient(session_actor_handle(args), args["long_poll_s"])
        install_credential_source(source)
    return source


def span_sink(metrics_enabled: bool, metrics: Any = None) -> Optional[ActorSpanSink]:
    """Finished spans of a replica go, in batches, to the metrics actor (for /traces):
    ``metrics`` when given (the gateway's own), else the named actor."""
    if not metrics_enabled:
        return None
    return ActorSpanSink(METRICS_ACTOR, namespace=NAMESPACE,
                         resolve=None if metrics is None else (lambda: metrics))

"""The top of the settings tree (:class:`TroupeSettings`) and how it is loaded."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import yaml
from pydantic import (
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from serve_app.settings.base import ConfigError, Strict
from serve_app.settings.engines import RemoteEngineConfig
from serve_app.settings.models import (
    ModelConfig,
    RayActorOptions,
)
from serve_app.settings.observability import TracingSettings
from serve_app.settings.policies import (
    AuthSettings,
    BatchSettings,
    CORSSettings,
    IdempotencySettings,
    LimitsSettings,
)
from serve_app.settings.realtime import RealtimeSettings

#: Engines whose threads are torch's (one per-process intra-op pool).
_TORCH_ENGINES = frozenset({"transformers", "sentence-transformers", "gan"})

__all__ = [
    "GatewayOptions",
    "MetricsSettings",
    "SessionSettings",
    "TroupeSettings",
    "load_settings",
]


class GatewayOptions(Strict):
    """The ingress deployment (HTTP host/port come from Serve's ``http_options``)."""

    num_replicas: int = Field(1, ge=1, description="Gateway replicas.")
    max_ongoing_requests: int = Field(
        1000, ge=1, description="Concurrent requests per gateway replica."
    )
    ray_actor_options: RayActorOptions = Field(
        default_factory=lambda: RayActorOptions(num_cpus=0.25, num_gpus=0, memory=None),
        description="Resources per gateway replica.",
    )
    stream_idle_timeout_s: float = Field(
        300, gt=0, description="Longest gap between stream chunks before TIMEOUT."
    )
    request_timeout_s: float = Field(600, gt=0, description="Longest non-stream request.")
    sse_keepalive_s: Optional[float] = Field(
        15.0, gt=0,
        description="Send an SSE comment line when a stream has been silent this long "
        "(keeps proxies from closing idle streams); null disables.",
    )
    health_timeout_s: float = Field(2.0, gt=0, description="Per-model wait in GET /health.")
    max_body_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest accepted request body (413 beyond)."
    )
    image_url_allow: list[str] = Field(
        default_factory=list,
        description="Hosts whose http(s) image URLs the gateway fetches for vision models "
        "(exact names, or '.example.com' for a domain); data: URLs need no entry. Their "
        "addresses pass the same private-address checks as webhook URLs.",
    )
    max_image_bytes: int = Field(
        10 * 1024 * 1024, ge=1024, description="Largest image accepted, inline or fetched."
    )
    admin_key_env: str = Field(
        "TROUPE_ADMIN_KEY",
        description="Environment variable holding the admin key for /admin routes "
        "(unset: admin routes answer 403).",
    )


class MetricsSettings(Strict):
    """The metrics actor (cost ledger, Prometheus, usage) and the recorders feeding it."""

    enabled: bool = Field(True, description="Record every request's usage, cost and latency.")
    store_url: Optional[str] = Field(
        None,
        description="Ledger store: sqlite:///abs/path.db or postgresql://user@host:port/db. "
        "Default: a SQLite file of this Serve app's own, "
        "$TROUPE_STATE_DIR/apps/<app name>-<digest>/troupe.db (TROUPE_STATE_DIR defaults to "
        "~/.local/share/troupe); two apps share a store only when both name it here.",
    )
    flush_interval_s: float = Field(
        0.5, gt=0, le=60, description="Longest time an event waits in a replica's buffer."
    )
    max_batch: int = Field(256, ge=1, description="Events per flush to the actor.")
    max_buffer: int = Field(
        100_000, ge=1, description="Events a replica keeps while the actor is unreachable."
    )
    histogram_buckets_ms: Optional[dict[str, list[float]]] = Field(
        None,
        description="Bucket bounds per histogram (queue_wait, ttft, inter_token, e2e, "
        "cold_start_ttft)."
    )
    actor_num_cpus: float = Field(0.1, ge=0, description="CPUs reserved for the metrics actor.")
    serve_poll_interval_s: float = Field(
        15.0, ge=0, description="How old the replica counts on /metrics may be: a scrape that "
        "finds them older reads them from Serve's controller; nothing is read between scrapes "
        "(0: never)."
    )


class SessionSettings(Strict):
    """The session actor: provider credentials from env, a watched secrets file, the admin API."""

    secrets_file: Optional[str] = Field(
        None,
        description="YAML/JSON mapping credential name -> API key (or {api_key: ...}); "
        "re-read when it changes on disk (a rotated mounted secret needs no restart).",
    )
    poll_interval_s: float = Field(
        0.25, gt=0, le=60, description="How often the secrets file is checked for changes."
    )
    store_url: Optional[str] = Field(
        None, description="Store for admin-set credentials. Default: the metrics store URL."
    )
    long_poll_s: float = Field(
        20.0, gt=0, le=300, description="How long a replica's wait for a new snapshot lasts."
    )
    actor_num_cpus: float = Field(0.05, ge=0, description="CPUs reserved for the session actor.")
    actor_name: str = Field(
        "troupe-session",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Name of the session actor (Troupe apps sharing a cluster use one each).",
    )


class TroupeSettings(Strict):
    """The whole gateway configuration."""

    models: list[ModelConfig] = Field(..., min_length=1, description="Served models.")
    gateway: GatewayOptions = Field(default_factory=GatewayOptions, description="Ingress.")
    metrics: MetricsSettings = Field(
        default_factory=MetricsSettings, description="Cost ledger, Prometheus and usage."
    )
    tracing: TracingSettings = Field(
        default_factory=TracingSettings, description="Request tracing (OpenTelemetry)."
    )
    session: SessionSettings = Field(
        default_factory=SessionSettings, description="Provider credentials (session actor)."
    )
    log_unknown_fields: bool = Field(
        True, description="Log request fields Troupe does not know (they are ignored)."
    )
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys and JWTs.")
    limits: LimitsSettings = Field(
        default_factory=LimitsSettings, description="Rate limits per key."
    )
    idempotency: IdempotencySettings = Field(
        default_factory=IdempotencySettings, description="Idempotency-Key replay."
    )
    cors: CORSSettings = Field(default_factory=CORSSettings, description="CORS for browsers.")
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Batch jobs.")
    realtime: RealtimeSettings = Field(
        default_factory=RealtimeSettings, description="The Realtime API (/v1/realtime)."
    )

    def cpus_at_start(self) -> float:
        """Ray CPUs the app reserves once it is up: every replica that starts (fixed count,
        or an autoscaled model's min_replicas), its placement bundles, and the actors.

        Ray never runs a replica whose CPUs are not free, so a config that asks for more
        than the cluster has leaves a replica (maybe the gateway) waiting forever.
        """
        total = self.gateway.num_replicas * self.gateway_num_cpus()
        for model in self.models:
            if model.run_in == "gateway":
                continue
            dep = model.deployment
            replicas = dep.autoscaling.min_replicas if dep.autoscaling else (dep.num_replicas or 1)
            per_replica = dep.ray_actor_options.num_cpus + sum(
                b.get("CPU", 0.0) for b in dep.placement_group_bundles or ())
            total += replicas * per_replica
        total += self.metrics.actor_num_cpus + self.session.actor_num_cpus
        total += self.limits.actor_num_cpus
        return round(total, 3)

    def gateway_num_cpus(self) -> float:
        """Ray CPUs of one gateway replica: its own, plus those of every model that computes
        inside it (``run_in: gateway``; remote providers and mocks add none)."""
        folded = sum(m.deployment.ray_actor_options.num_cpus
                     for m in self.models if m.run_in == "gateway" and m.computes_locally)
        return round(self.gateway.ray_actor_options.num_cpus + folded, 3)

    @model_validator(mode="after")
    def _one_torch_thread_count_in_the_gateway(self) -> "TroupeSettings":
        """torch's intra-op thread count is per process: the torch engines hosted in the
        gateway must agree on it, or one would silently change the others'."""
        counts = {m.id: getattr(m.engine, "num_threads", None) for m in self.models
                  if m.run_in == "gateway" and m.engine.type in _TORCH_ENGINES}
        if len(set(counts.values())) > 1:
            raise ValueError(
                "models with run_in: gateway share one torch thread pool, so their "
                f"engine.num_threads must match (got {counts}); set one value, or give a "
                "model its own deployment (run_in: deployment)")
        return self

    @field_validator("models")
    @classmethod
    def _unique_ids(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        seen: set[str] = set()
        for model in models:
            if model.id in seen:
                raise ValueError(f"duplicate model id {model.id!r}: model ids must be unique")
            seen.add(model.id)
        return models

    @field_validator("models")
    @classmethod
    def _one_env_per_credential(cls, models: list[ModelConfig]) -> list[ModelConfig]:
        envs: dict[str, str] = {}
        for model in models:
            if not isinstance(model.engine, RemoteEngineConfig):
                continue
            name, env = model.engine.credential_name, model.engine.api_key_env
            if envs.setdefault(name, env) != env:
                raise ValueError(
                    f"credential {name!r} is read from both ${envs[name]} and ${env}: give "
                    "one of the engines its own `credential` name"
                )
        return models

    @model_validator(mode="after")
    def _flex_pools_exist(self) -> "TroupeSettings":
        ids = {m.id for m in self.models}
        for model in self.models:
            if model.flex_pool is not None and (
                model.flex_pool not in ids or model.flex_pool == model.id
            ):
                raise ValueError(
                    f"model {model.id!r}: flex_pool {model.flex_pool!r} must be the id of "
                    "another configured model"
                )
        return self

    @model_validator(mode="after")
    def _realtime_proxies_are_remote_openai(self) -> "TroupeSettings":
        for model_id in self.realtime.proxy:
            model = self.model(model_id)
            if model is None or getattr(model.engine, "type", None) != "openai":
                raise ValueError(
                    f"realtime.proxy: {model_id!r} must be the id of a configured model with "
                    "a remote openai engine (its provider's realtime endpoint is used)")
        return self

    def credential_envs(self) -> dict[str, str]:
        """Credential name -> environment variable, over every remote model."""
        out: dict[str, str] = {}
        for model in self.models:
            if isinstance(model.engine, RemoteEngineConfig):
                out[model.engine.credential_name] = model.engine.api_key_env
        return out

    def model(self, model_id: str) -> Optional[ModelConfig]:
        for model in self.models:
            if model.id == model_id:
                return model
        return None


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {path}: {e['msg']}")
    return "invalid Troupe configuration:\n" + "\n".join(lines)


def load_settings(args: Optional[dict[str, Any]] = None) -> TroupeSettings:
    """Build settings from Serve ``args``, a YAML file, or ``TROUPE_CONFIG_FILE``.

    ``args`` may hold ``config_file`` (a YAML file with the settings tree); the other keys
    of ``args`` override that file's top-level keys.

    Raises:
        ConfigError: naming each invalid field by its dotted path.
    """
    data: dict[str, Any] = dict(args or {})
    config_file = data.pop("config_file", None) or (
        None if data else os.environ.get("TROUPE_CONFIG_FILE")
    )
    if config_file:
        path = Path(config_file)
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping")
        data = {**loaded, **data}
    try:
        return TroupeSettings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from None

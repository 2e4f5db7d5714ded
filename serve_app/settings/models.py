"""One configured model: its engine, its Serve deployment options and its prices."""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import (
    Field,
    model_validator,
)

from serve_app.settings.adapters import AdapterSettings
from serve_app.settings.base import Strict
from serve_app.settings.engines import (
    EngineConfig,
)
from serve_app.settings.modality import (
    check_engine_fits,
    engine_type_for,
)

__all__ = [
    "RayActorOptions",
    "AutoscalingOptions",
    "DeploymentOptions",
    "RoutingOptions",
    "PricingConfig",
    "ModelConfig",
]


class RayActorOptions(Strict):
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


class AutoscalingOptions(Strict):
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


class RoutingOptions(Strict):
    """How callers pick one of a local text model's replicas (serve_app/build/session_router.py)."""

    policy: Literal["session", "power_of_two"] = Field(
        "power_of_two",
        description="power_of_two: Serve's default (the less loaded of two random replicas); "
        "session (opt-in until it has a longer record, used only with more than one "
        "replica): keep a conversation (its prompt_cache_key, else its opening turns) on the "
        "replica that holds its prefix.",
    )
    max_imbalance: int = Field(
        4, ge=0,
        description="session: how many more requests in flight a conversation's replica may "
        "have than the least loaded one before its requests go to that one instead.",
    )


class DeploymentOptions(Strict):
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
    routing: RoutingOptions = Field(
        default_factory=RoutingOptions,
        description="Replica choice for local text models with several replicas.",
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


class PricingConfig(Strict):
    """Prices of one model, overriding the packaged list-price table (serve_app/data).

    Local models default to per-token rates (0 unless set). Replica-time pricing is
    optional: a request is charged its share of the replica's time at the hourly rate.
    """

    input_usd_per_million: float = Field(0.0, ge=0, description="USD per 1M prompt tokens.")
    output_usd_per_million: float = Field(0.0, ge=0, description="USD per 1M completion tokens.")
    cached_input_usd_per_million: Optional[float] = Field(
        None, ge=0, description="USD per 1M prompt tokens served from the provider's prompt "
        "cache (None: the input rate)."
    )
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


class ModelConfig(Strict):
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
    vision: bool = Field(
        False, description="The model accepts image input (listed as the 'vision' capability)."
    )
    flex_pool: Optional[str] = Field(
        None,
        description="Id of another configured model that serves this one's cheap tier for "
        "start_within durations (e.g. spot or scale-to-zero replicas of the same weights).",
    )
    run_in: Literal["deployment", "gateway"] = Field(
        "deployment",
        description="Where the engine runs: its own Serve deployment, or inside each gateway "
        "replica (no hop and no idle process of its own; for engines that hold no "
        "accelerator: remote providers, the mock, the CPU engines and vLLM's CPU build, "
        "whose engine core keeps its own process). A model in the gateway adds its "
        "ray_actor_options.num_cpus to the gateway's reservation.",
    )
    adapters: Optional[AdapterSettings] = Field(
        None,
        description="LoRA adapters on this text model (mock, transformers and vllm engines); "
        "None: the model serves no adapters and refuses registrations.",
    )

    @property
    def computes_locally(self) -> bool:
        """The engine does its own compute (weights in this process): not a remote provider
        and not the mock."""
        return self.provider == "local" and not self.engine.type.startswith("mock")

    @model_validator(mode="after")
    def _fits_in_the_gateway(self) -> "ModelConfig":
        if self.run_in != "gateway":
            return self
        dep = self.deployment
        if dep.ray_actor_options.num_gpus > 0 or dep.placement_group_bundles \
                or getattr(self.engine, "tensor_parallel_size", 1) > 1:
            raise ValueError("run_in: gateway is for engines without an accelerator (remote "
                             "providers, the mock, CPU engines, vLLM's CPU build); a GPU "
                             "model needs its own deployment (run_in: deployment)")
        if dep.autoscaling is not None or (dep.num_replicas or 1) > 1:
            raise ValueError("a model with run_in: gateway runs once in each gateway replica: "
                             "scale it with gateway.num_replicas, or give it its own "
                             "deployment (run_in: deployment) to set deployment.num_replicas "
                             "or autoscaling")
        return self

    @model_validator(mode="after")
    def _adapters_on_local_text(self) -> "ModelConfig":
        if self.adapters is not None and (self.modality != "text" or self.provider != "local"):
            raise ValueError("adapters are served only by local text engines (mock, "
                             "transformers, vllm); remove 'adapters' from this model")
        if self.adapters is not None and getattr(self.engine, "weights", None) in ("int8", "auto"):
            raise ValueError("LoRA adapters need engine.weights bfloat16 or float32 (int8 "
                             "and int4 layers take no adapters); change engine.weights or "
                             "remove 'adapters'")
        return self

    @model_validator(mode="before")
    @classmethod
    def _vllm_lora_slots(cls, data: Any) -> Any:
        """vLLM sizes its LoRA slots at start: from ``adapters`` unless the engine sets them.
        The transformers engine holds its weights in bfloat16 unless told otherwise (peft's
        LoRA layers wrap plain Linear layers, not the int8 ones)."""
        if not isinstance(data, dict) or not isinstance(data.get("adapters"), dict):
            return data
        engine = data.get("engine")
        if isinstance(engine, dict) and engine.get("type") == "transformers":
            return {**data, "engine": {"weights": "bfloat16", **engine}}
        if not isinstance(engine, dict) or engine.get("type") != "vllm":
            return data
        adapters = data["adapters"]
        fields = AdapterSettings.model_fields
        defaults = {"max_loras": adapters.get("max_loaded", fields["max_loaded"].default),
                    "max_lora_rank": adapters.get("max_rank", fields["max_rank"].default)}
        return {**data, "engine": {**defaults, **engine}}

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

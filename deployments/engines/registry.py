"""The one engine registry: (modality, engine type) -> the engine class that serves it.

Engine modules are imported only when a model configures them, so the CPU install never
imports vLLM and the mocks never import torch. Adding an engine means adding its module
and one entry in ``_ENGINES``; no deployment and no route changes.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["create_engine", "create_text_engine", "engine_class_path", "ENGINE_KINDS"]

_ENGINES: dict[tuple[str, str], str] = {
    ("text", "mock"): "deployments.engines.mock:MockTextEngine",
    ("text", "transformers"): "deployments.engines.transformers_cpu:TransformersTextEngine",
    ("text", "vllm"): "deployments.engines.vllm_engine:VLLMTextEngine",
    ("text", "openai"): "deployments.engines.remote.openai:OpenAITextEngine",
    ("text", "anthropic"): "deployments.engines.remote.anthropic:AnthropicTextEngine",
    ("text", "gemini"): "deployments.engines.remote.gemini:GeminiTextEngine",
    ("embeddings", "mock-embeddings"): "deployments.engines.mock_modalities:MockEmbeddingEngine",
    # remote providers' embeddings APIs (the engine config is the provider's text config)
    ("embeddings", "openai"): "deployments.engines.remote.embeddings:RemoteEmbeddingEngine",
    ("embeddings", "gemini"): "deployments.engines.remote.embeddings:RemoteEmbeddingEngine",
    ("embeddings", "sentence-transformers"):
        "deployments.engines.sentence_transformers_engine:SentenceTransformersEngine",
    ("embeddings", "vllm-pooling"): "deployments.engines.vllm_pooling:VLLMPoolingEngine",
    ("speech", "mock-speech"): "deployments.engines.mock_modalities:MockSpeechEngine",
    ("speech", "piper"): "deployments.engines.piper_tts:PiperEngine",
    ("transcription", "mock-transcription"):
        "deployments.engines.mock_modalities:MockTranscriptionEngine",
    ("transcription", "faster-whisper"): "deployments.engines.whisper_asr:FasterWhisperEngine",
    ("image", "mock-image"): "deployments.engines.mock_modalities:MockImageEngine",
    ("image", "gan"): "deployments.engines.gan_image:GANImageEngine",
    ("image", "diffusers"): "deployments.engines.diffusers_image:DiffusersImageEngine",
}
#: Text engine types (the config's ``engine.type`` of a text model).
ENGINE_KINDS = tuple(kind for modality, kind in _ENGINES if modality == "text")


def engine_class_path(modality: str, engine_type: str) -> str:
    """``module:Class`` of the engine serving ``engine_type`` for ``modality``.

    Raises:
        KeyError: naming the engine types that modality has.
    """
    try:
        return _ENGINES[(modality, engine_type)]
    except KeyError:
        kinds = sorted(kind for m, kind in _ENGINES if m == modality)
        raise KeyError(
            f"no {modality} engine of type {engine_type!r}; known: {', '.join(kinds)}"
        ) from None


def create_engine(modality: str, model_id: str, config: Any) -> Any:
    """Instantiate (not start) the engine a model's config names."""
    module_name, class_name = engine_class_path(modality, config.type).split(":")
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    return engine_cls(model_id=model_id, config=config)


def create_text_engine(model_id: str, config: Any) -> Any:
    """A text engine (also what a remote embeddings engine wraps)."""
    return create_engine("text", model_id, config)

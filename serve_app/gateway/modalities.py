"""What the gateway knows of each modality: capabilities, the route serving it, its card.

Calls to the non-text models go through :class:`serve_app.gateway.core.GatewayCore`
(``embed``, ``speak``, ``transcribe``, ``generate_images``), which checks that a model
serves the route's modality and is loaded, then calls it through its dispatcher, with
the same in-flight counts, timeouts, metering and error translation as text.
"""

from __future__ import annotations

from typing import Any

from serve_app.gateway.dispatch import default_merge_in_flight
from serve_app.settings import ModelConfig

__all__ = [
    "MODALITY_CAPABILITIES",
    "MODALITY_NOUN",
    "MODALITY_ROUTE",
    "default_merge_in_flight",
    "modality_card",
]

#: Capabilities shown in /models, per modality.
MODALITY_CAPABILITIES: dict[str, list[str]] = {
    "text": ["text-generation", "chat", "completions", "streaming"],
    "embeddings": ["embeddings"],
    "speech": ["text-to-speech", "streaming"],
    "transcription": ["speech-to-text"],
    "image": ["image-generation"],
}
#: The capability a route needs, per modality (also names the model kind in errors).
MODALITY_NOUN = {
    "text": "text-generation",
    "embeddings": "embeddings",
    "speech": "text-to-speech",
    "transcription": "speech-to-text",
    "image": "image-generation",
}
#: A route that serves each modality (for "use this instead" hints).
MODALITY_ROUTE = {
    "text": "POST /v1/chat/completions",
    "embeddings": "POST /v1/embeddings",
    "speech": "POST /v1/audio/speech",
    "transcription": "POST /v1/audio/transcriptions",
    "image": "POST /v1/images/generations",
}


def modality_card(model: ModelConfig) -> dict[str, Any]:
    """Extra /models fields of a non-text model (what it offers and cannot do)."""
    card: dict[str, Any] = {}
    engine = model.engine
    if model.modality == "image":
        card["sizes"] = list(getattr(engine, "sizes", ()))
        card["follows_prompt"] = engine.type == "diffusers"
    return card

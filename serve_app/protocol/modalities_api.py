"""Wire request bodies of the embeddings, speech, transcription and image routes.

OpenAI's shapes (also used by the native ``POST /embeddings``). Unknown fields are
accepted and logged, never an error. Imports only pydantic.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "EmbeddingsBody",
    "SpeechBody",
    "ImageBody",
    "TRANSCRIPTION_FORMATS",
    "SPEECH_EXAMPLE",
    "IMAGE_EXAMPLE",
    "EMBEDDINGS_EXAMPLE",
    "parse_size",
]

EMBEDDINGS_EXAMPLE = '{"model": "all-minilm-l6-v2", "input": ["The food was delicious."]}'
SPEECH_EXAMPLE = '{"model": "piper-joe", "input": "Hello there.", "voice": "alloy", "response_format": "mp3"}'
IMAGE_EXAMPLE = '{"model": "dcgan-faces", "prompt": "a face", "n": 1, "size": "256x256", "response_format": "b64_json"}'
TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class EmbeddingsBody(_Body):
    model: str = Field(..., min_length=1)
    input: Union[str, list[str], list[int], list[list[int]]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Optional[int] = None
    user: Optional[str] = None

    @field_validator("input")
    @classmethod
    def _token_ids(cls, value):
        ids = [value] if value and isinstance(value, list) and isinstance(value[0], int) else (
            [x for x in value if isinstance(x, list)] if isinstance(value, list) else [])
        if any(not 0 <= t < 2**31 for arr in ids for t in arr):
            raise ValueError("token ids must be integers in the model's vocabulary (>= 0)")
        return value

    def inputs(self) -> list[Union[str, list[int]]]:
        """One list of inputs: a string, a token array, or a list of either."""
        if isinstance(self.input, str):
            return [self.input]
        if self.input and all(isinstance(x, int) for x in self.input):
            return [[x for x in self.input if isinstance(x, int)]]  # one token array
        return [x for x in self.input if not isinstance(x, int)]


class SpeechBody(_Body):
    model: str = Field(..., min_length=1)
    input: str
    voice: str = "alloy"
    response_format: str = "mp3"
    speed: float = 1.0
    instructions: Optional[str] = None


class ImageBody(_Body):
    prompt: str
    model: Optional[str] = None
    n: int = 1
    size: Optional[str] = None
    response_format: str = "b64_json"
    seed: Optional[int] = Field(None, description="Troupe extension: fixes the output.")
    quality: Optional[str] = None
    style: Optional[str] = None
    user: Optional[str] = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("prompt is empty; describe the image")
        if len(v) > 4000:
            raise ValueError(f"prompt has {len(v)} characters; at most 4000")
        return v


def parse_size(size: str) -> Optional[tuple[int, int]]:
    """"256x256" -> (256, 256); None when malformed."""
    parts = size.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    w, h = int(parts[0]), int(parts[1])
    return (w, h) if w > 0 and h > 0 else None

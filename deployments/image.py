"""The image generation deployment: a plain class over one :class:`ImageEngine`.

The engine draws at its own size; this class checks the requested size against the
sizes offered, resizes with Pillow (Lanczos) and encodes PNG.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any, Optional

import numpy as np

from deployments.engines.modality_base import ImageEngine
from deployments.lifecycle import EngineHost
from serve_app.errors import InvalidRequest
from serve_app.protocol.modalities import ImageRequest, ImageResult
from serve_app.settings import ModelConfig
from serve_app.settings.modality import image_sizes

__all__ = ["ImageDeployment", "IMAGE_EXAMPLE", "MAX_IMAGES", "to_png"]


IMAGE_EXAMPLE = '{"model": "dcgan-faces", "prompt": "a face", "n": 1, "size": "256x256"}'
MAX_IMAGES = 10


def to_png(pixels: np.ndarray, width: int, height: int) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.ascontiguousarray(pixels, dtype=np.uint8), mode="RGB")
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class ImageDeployment(EngineHost):
    """Serves one image model."""

    def __init__(self, model: ModelConfig | dict[str, Any], engine: Optional[ImageEngine] = None):
        super().__init__(model, engine)

    def sizes(self) -> list[str]:
        return image_sizes(self.model.engine)

    async def generate(self, request: ImageRequest) -> ImageResult:
        engine = await self._ready_engine()
        size = f"{request.width}x{request.height}"
        if size not in engine.sizes:
            raise InvalidRequest(
                f"size {size!r} is not offered by model {self.model.id!r}; use one of "
                f"{', '.join(engine.sizes)}, e.g. {IMAGE_EXAMPLE}",
                param="size",
            )
        if not 1 <= request.n <= MAX_IMAGES:
            raise InvalidRequest(
                f"n={request.n} is out of range: ask for 1 to {MAX_IMAGES} images.", param="n"
            )
        with self._counting(), self._engine_errors("drawing"):
            arrays = await engine.generate(
                request.prompt, request.n, request.seed, request.width, request.height
            )
            images = await asyncio.to_thread(
                lambda: [to_png(a, request.width, request.height) for a in arrays]
            )
        return ImageResult(images)

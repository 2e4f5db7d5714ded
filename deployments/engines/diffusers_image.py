"""Text-to-image with a diffusers pipeline from local files (GPU; imported lazily).

``DiffusionPipeline.from_pretrained(folder, local_files_only=True)``: no hub access.
The pipeline draws at the requested size directly (it must be one the config offers).
"""

from __future__ import annotations

import asyncio
from typing import Any, Optional

import numpy as np

from deployments.engines.gan_image import prompt_seed
from serve_app.settings.modality import DiffusersEngineConfig

__all__ = ["DiffusersImageEngine"]


class DiffusersImageEngine:
    follows_prompt = True

    def __init__(self, model_id: str, config: DiffusersEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.sizes = list(config.sizes)
        self.native_size = int(self.sizes[0].split("x")[0])
        self.pipe: Any = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        from diffusers import DiffusionPipeline  # lazy: heavy, and only image models need it

        dtype = getattr(torch, self.config.dtype)
        pipe = DiffusionPipeline.from_pretrained(
            self.config.model, dtype=dtype, local_files_only=True
        )
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        self.pipe = pipe.to(self.config.device)

    def _draw(self, prompt: str, n: int, seed: Optional[int], width: int, height: int) -> list[np.ndarray]:
        import torch

        gen = torch.Generator(device="cpu").manual_seed(prompt_seed(prompt, seed))
        out = self.pipe(
            prompt=prompt, num_images_per_prompt=n, width=width, height=height,
            num_inference_steps=self.config.num_inference_steps,
            guidance_scale=self.config.guidance_scale, generator=gen, output_type="np",
        )
        images = np.asarray(out.images, dtype=np.float32)
        return [np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8) for img in images]

    async def generate(self, prompt: str, n: int, seed: Optional[int], width: int, height: int) -> list[np.ndarray]:
        async with self._lock:
            return await asyncio.to_thread(self._draw, prompt, n, seed, width, height)

    async def shutdown(self) -> None:
        self.pipe = None

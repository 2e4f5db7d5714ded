"""One real vLLM CPU engine for the whole ``tests/vllm_real`` session (weights load once).

Skipped (every module here) when vLLM is not importable (the main venv) or
``TROUPE_VLLM_MODEL`` names no folder; ``make test-vllm`` sets both up.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Optional

import pytest_asyncio

from serve_app.settings import VLLMEngineConfig

MODEL_ENV = "TROUPE_VLLM_MODEL"
MODEL = os.environ.get(MODEL_ENV, "")


def skip_reason() -> Optional[str]:
    """Why these tests cannot run here (None: they can)."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed here: run `make test-vllm` (it builds .venv-vllm)"
    if not Path(MODEL).is_dir():
        return f"set {MODEL_ENV} to a local model folder (make models writes SmolLM2's)"
    return None


def cpu_config(**overrides: Any) -> VLLMEngineConfig:
    """The bundled model on vLLM's CPU build, as config/vllm-cpu.yaml serves it."""
    return VLLMEngineConfig(**{
        "model": MODEL,
        "max_model_len": 2048,
        "dtype": os.environ.get("TROUPE_VLLM_DTYPE", "bfloat16"),
        "enforce_eager": True,
        **overrides,
    })


async def started(model_id: str, config: VLLMEngineConfig) -> Any:
    """A started VLLMTextEngine (vLLM imported only now)."""
    from deployments.engines.vllm_engine import VLLMTextEngine

    engine = VLLMTextEngine(model_id, config)
    await engine.start()
    return engine


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def engine():
    eng = await started("smollm2-vllm-cpu", cpu_config())
    try:
        yield eng
    finally:
        await eng.shutdown()

"""A real vLLM engine behind VLLMTextEngine: stream, usage, abort, cancel, context limit.

Runs only where a CUDA GPU is visible, vLLM is importable (the ``gpu`` extra), and
``TROUPE_VLLM_MODEL`` names a local model folder, e.g.::

    TROUPE_VLLM_MODEL=/models/Qwen2.5-0.5B-Instruct pytest tests/gpu -q

``TROUPE_VLLM_GPU_MEMORY`` (default 0.5) is the KV-cache share of the GPU it may take.
The engine starts once per module (weights load once); all tests share its event loop.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path
from typing import Optional

import pytest
import pytest_asyncio

from serve_app.settings import VLLMEngineConfig
from serve_app.errors import ContextLengthExceeded
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams

MODEL_ENV = "TROUPE_VLLM_MODEL"


def _skip_reason() -> Optional[str]:
    # Cheapest checks first: torch is imported only when the rest is in place.
    model = os.environ.get(MODEL_ENV)
    if not model or not Path(model).is_dir():
        return f"set {MODEL_ENV} to a local model folder to run the vLLM smoke test"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install 'troupe-serve[gpu]')"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    return None


_SKIP = _skip_reason()

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.asyncio(loop_scope="module"),
]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    from deployments.engines.vllm_engine import VLLMTextEngine

    config = VLLMEngineConfig(
        model=os.environ[MODEL_ENV],
        max_model_len=2048,
        gpu_memory_utilization=float(os.environ.get("TROUPE_VLLM_GPU_MEMORY", "0.5")),
        enforce_eager=True,  # skip CUDA graph capture: a faster start for a smoke test
    )
    engine = VLLMTextEngine("smoke", config)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


def _chat(request_id: str, text: str, max_tokens: Optional[int]) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0),
        messages=[ChatMessage("user", text)],
    )


COUNTING = "Count from 1 to 500, separated by commas. Do not stop early."


async def test_streams_deltas_with_exact_usage(engine):
    outputs = [o async for o in engine.generate(_chat("smoke-stream", COUNTING, 16))]

    final = outputs[-1]
    assert final.finish_reason in ("stop", "length")
    assert all(o.finish_reason is None for o in outputs[:-1])
    total = sum(o.num_tokens for o in outputs)
    # DELTA outputs: token counts add up to at most max_tokens (cumulative ones would not).
    assert 0 < total <= 16
    if final.finish_reason == "length":
        assert total == 16
    assert "".join(o.text for o in outputs).strip()
    assert len({o.prompt_tokens for o in outputs}) == 1 and final.prompt_tokens > 0
    assert engine.active_requests() == 0


async def test_closing_the_stream_frees_the_request(engine):
    stream = engine.generate(_chat("smoke-close", COUNTING, 1024))
    for _ in range(2):
        out = await asyncio.wait_for(anext(stream), timeout=60)
        assert out.finish_reason is None
    assert engine.active_requests() == 1
    await stream.aclose()
    assert engine.active_requests() == 0

    # The engine is still healthy afterwards.
    outputs = [o async for o in engine.generate(_chat("smoke-after", "Say hi.", 8))]
    assert outputs[-1].finish_reason in ("stop", "length")


async def test_abort_ends_the_stream_with_abort(engine):
    stream = engine.generate(_chat("smoke-abort", COUNTING, 1024))
    await asyncio.wait_for(anext(stream), timeout=60)
    await engine.abort("smoke-abort")

    async def drain():
        return [o async for o in stream]

    rest = await asyncio.wait_for(drain(), timeout=30)
    assert rest and rest[-1].finish_reason == "abort"
    assert sum(o.num_tokens for o in rest) < 1024
    assert engine.active_requests() == 0


async def test_a_request_over_the_context_is_refused(engine):
    with pytest.raises(ContextLengthExceeded):
        await anext(engine.generate(_chat("smoke-long", "Hello", engine.context_length)))
    assert engine.active_requests() == 0

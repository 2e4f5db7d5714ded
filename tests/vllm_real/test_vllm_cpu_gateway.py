"""A real vLLM CPU engine hosted inside the gateway (``run_in: gateway``, config/vllm-cpu.yaml's
layout), on the bundled SmolLM2 (``make test-vllm``): the gateway's process holds only
vLLM's front end while its engine core and CPU worker run in processes of their own, the
worker bound to cores of its own (``VLLM_CPU_OMP_THREADS_BIND=auto``, as when a model
replica starts it); the official ``openai`` client streams a chat through the gateway's app;
``/health`` shows the model; unloading it ends vLLM's processes.

This runs the gateway's app in this process (no Ray, no Serve): what it checks is the
in-gateway hosting of the real engine; Serve's shutdown path calls the same
``InGatewayModels.shutdown``.

Last run (2-core machine, vllm-cpu 0.32.0, bfloat16): 1 passed in 35 s (and
test_vllm_cpu.py, whose engine now also starts in a worker thread: 6 passed).
"""

from __future__ import annotations

import asyncio
import os

import httpx
import psutil
import pytest

from tests.vllm_real.conftest import MODEL, skip_reason

_SKIP = skip_reason()
pytestmark = [
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.asyncio(loop_scope="session"),
]

MODEL_ID = "smollm2-vllm-in-gateway"


def _vllm_processes() -> list[psutil.Process]:
    """vLLM's engine core and workers started by this process and still running (vLLM
    kills a slow-exiting engine core without reaping it: a zombie has ended)."""
    running = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.name().startswith("VLLM::") and p.status() != psutil.STATUS_ZOMBIE:
                running.append(p)
        except psutil.NoSuchProcess:
            continue
    return running


async def test_vllm_served_from_inside_the_gateway_ends_its_processes_on_unload():
    import openai

    from serve_app.build.app import build_fastapi_app
    from serve_app.build.in_gateway import InGatewayModels
    from serve_app.gateway.core import GatewayCore
    from serve_app.gateway.model_state import MemoryModelState
    from serve_app.settings import load_settings

    settings = load_settings({"models": [{
        "id": MODEL_ID, "run_in": "gateway",
        "engine": {"type": "vllm", "model": MODEL, "max_model_len": 2048, "enforce_eager": True,
                   "dtype": os.environ.get("TROUPE_VLLM_DTYPE", "bfloat16"),
                   "extra_engine_args": {"kv_cache_memory_bytes": 256 << 20, "max_num_seqs": 8}},
        "deployment": {"ray_actor_options": {"num_cpus": 0.5}}}]})
    before = {p.pid for p in _vllm_processes()}  # the session engine's (conftest)
    all_cores = os.sched_getaffinity(0)
    hosted = InGatewayModels(settings)
    await hosted.start()
    try:
        mine = [p for p in _vllm_processes() if p.pid not in before]
        assert any(p.name() == "VLLM::EngineCore" for p in mine), mine
        if len(all_cores) > 1:  # vLLM kept a core for the serving processes
            workers = [p for p in mine if p.name() == "VLLM::Worker"]
            held = set().union(*(w.cpu_affinity() for w in workers))
            assert workers and held < all_cores
            # the host (here: this process, as the gateway replica) and the engine core
            # moved off the worker's cores (vllm_cpu_affinity)
            assert os.sched_getaffinity(0) == all_cores - held
            assert all(set(p.cpu_affinity()) == all_cores - held
                       for p in mine if p.name() == "VLLM::EngineCore")
        core = GatewayCore(settings, hosted.handles, model_state=MemoryModelState())
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_fastapi_app(core)),
                                 base_url="http://gw", timeout=120)
        client = openai.AsyncOpenAI(base_url="http://gw/v1", api_key="local", http_client=http)
        stream = await client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "Count from 1 to 20."}],
            max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text.strip() and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 24
        health = {m["id"]: m for m in (await http.get("/health")).json()["models"]}
        assert health[MODEL_ID]["loaded"] and health[MODEL_ID]["engine"] == "vllm"

        assert (await http.post(f"/models/{MODEL_ID}/unload")).status_code == 200
        assert await _gone_except(before)
        refused = await http.post("/v1/chat/completions", json={
            "model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 409
        await http.aclose()
    finally:
        await hosted.shutdown()
        os.sched_setaffinity(0, all_cores)  # the rest of the session runs unpinned
    assert await _gone_except(before)


async def _gone_except(before: set[int], deadline_s: float = 60.0) -> bool:
    """No vLLM process of this process's left but those in ``before``, within the deadline."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    while loop.time() < end:
        if not [p for p in _vllm_processes() if p.pid not in before]:
            return True
        await asyncio.sleep(0.2)
    return False

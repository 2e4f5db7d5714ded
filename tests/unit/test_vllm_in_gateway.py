"""vLLM's CPU build hosted inside the gateway replica (``run_in: gateway``, issue 17): the
config rules, a chat streamed through the in-process handle, ``/health``, unload and load
rebuilding the engine, a LoRA adapter, and the gateway's shutdown ending it; with the fake AsyncLLM of
vllm_fakes (no vLLM). The real engine in the gateway: tests/vllm_real/test_vllm_cpu_gateway.py.
"""

from __future__ import annotations

import json
import os
from typing import Any, AsyncIterator

import httpx
import pytest

from deployments.engines.vllm_engine import VLLMTextEngine
from serve_app.build.app import build_fastapi_app
from serve_app.build.in_gateway import InGatewayModels
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.model_state import MemoryModelState
from serve_app.settings import load_settings
from tests.in_gateway import in_gateway_client
from tests.unit.test_lora_adapters import make_adapter
from tests.unit.vllm_fakes import FakeAsyncLLM, FakeLoRARequest, RecordedSamplingParams

VLLM_CPU = {"id": "smol-vllm", "run_in": "gateway",
            "engine": {"type": "vllm", "model": "/models/fake", "max_model_len": 64},
            "deployment": {"ray_actor_options": {"num_cpus": 0.5}}}


@pytest.fixture
def made(monkeypatch: pytest.MonkeyPatch) -> list[FakeAsyncLLM]:
    """Every VLLMTextEngine started here builds a FakeAsyncLLM instead of importing vLLM."""
    engines: list[FakeAsyncLLM] = []

    def bind(engine: VLLMTextEngine) -> None:
        def factory(engine_args: dict[str, Any]) -> FakeAsyncLLM:
            engines.append(FakeAsyncLLM(engine_args, max_model_len=64))
            return engines[-1]

        engine._engine_factory = factory
        engine._sampling_params_factory = RecordedSamplingParams
        engine.lora._factory = FakeLoRARequest

    monkeypatch.setattr(VLLMTextEngine, "_bind_vllm", bind)
    return engines


@pytest.fixture
async def gateway(made: list[FakeAsyncLLM]) -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings({"models": [VLLM_CPU], "gateway": {"ray_actor_options": {"num_cpus": 0.25}}})
    async with in_gateway_client(settings) as client:
        yield client


async def _chat(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={
        "model": "smol-vllm", "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}})


def _sse(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: {")]


def test_vllm_on_cpu_may_run_in_the_gateway_and_adds_its_cpus() -> None:
    settings = load_settings({"models": [VLLM_CPU],
                              "gateway": {"ray_actor_options": {"num_cpus": 0.25}}})
    assert settings.models[0].run_in == "gateway"
    assert settings.gateway_num_cpus() == 0.75


async def test_a_vllm_model_in_the_gateway_streams_and_reports_health(
        gateway: Any, made: list[FakeAsyncLLM]) -> None:
    assert len(made) == 1 and made[0].engine_args["served_model_name"] == "smol-vllm"
    response = await _chat(gateway)
    assert response.status_code == 200, response.text
    events = _sse(response)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == "Hello big wide world"
    assert events[-1]["usage"]["completion_tokens"] == 4  # every token counted, grouped or not
    health = {m["id"]: m for m in (await gateway.get("/health")).json()["models"]}
    assert health["smol-vllm"]["loaded"] and health["smol-vllm"]["status"] != "unloaded"
    stats = await gateway.hosted.handles["smol-vllm"].stats.remote()
    assert stats["pid"] == os.getpid() and stats["engine"] == "vllm"  # this very process
    assert stats["active_requests"] == 0 and stats["context_length"] == 64


async def test_unload_stops_the_vllm_engine_and_load_starts_a_new_one(
        gateway: Any, made: list[FakeAsyncLLM]) -> None:
    r = await gateway.post("/models/smol-vllm/unload")
    assert r.status_code == 200 and r.json()["loaded"] is False, r.text
    assert made[0].shutdown_calls == 1  # vLLM's engine core is told to stop
    refused = await _chat(gateway)
    assert refused.status_code == 409 and "POST /models/smol-vllm/load" in refused.text
    assert (await gateway.post("/models/smol-vllm/load")).json()["loaded"] is True
    assert len(made) == 2
    assert (await _chat(gateway)).status_code == 200


async def test_the_gateways_shutdown_stops_the_vllm_engine(made: list[FakeAsyncLLM]) -> None:
    hosted = InGatewayModels(load_settings({"models": [VLLM_CPU]}))
    await hosted.start()
    await hosted.shutdown()
    assert [e.shutdown_calls for e in made] == [1]


async def test_a_lora_adapter_reaches_vllm_in_the_gateway(made: list[FakeAsyncLLM], tmp_path) -> None:
    model = {**VLLM_CPU, "adapters": {"paths": {"terse": make_adapter(tmp_path / "terse", base="fake")}}}
    hosted = InGatewayModels(load_settings({"models": [model]}))
    await hosted.start()
    core = GatewayCore(load_settings({"models": [model]}), hosted.handles,
                       model_state=MemoryModelState())
    transport = httpx.ASGITransport(app=build_fastapi_app(core))
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            r = await client.post("/v1/chat/completions", json={
                "model": "smol-vllm:terse", "max_tokens": 8,
                "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        [fake] = made
        assert [lora.lora_name for lora in fake.loras.values()] == ["terse"]  # add_lora'd
        assert fake.submitted[-1].lora_request.lora_name == "terse"
    finally:
        await hosted.shutdown()

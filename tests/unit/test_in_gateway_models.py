"""Every modality hosted inside the gateway replica (``run_in: gateway``, issue 20): served
through the real in-process handles, unloaded and loaded, shown in ``/health``; and the
config rules around it (CPU reservation, what may not be folded, torch threads)."""

from __future__ import annotations

import asyncio
import base64
from typing import Any, AsyncIterator

import httpx
import numpy as np
import pytest

from deployments.audio import encode_audio
from serve_app.build.in_gateway import InGatewayModels
from serve_app.settings import ConfigError, load_settings
from tests.in_gateway import in_gateway_client

FOLDED = [
    {"id": "chat", "engine": {"type": "mock", "token_delay_ms": 0}, "run_in": "gateway"},
    {"id": "emb", "modality": "embeddings", "engine": {"type": "mock", "dimensions": 8},
     "run_in": "gateway"},
    {"id": "tts", "modality": "speech", "engine": {"type": "mock"}, "run_in": "gateway"},
    {"id": "asr", "modality": "transcription", "run_in": "gateway",
     "engine": {"type": "mock", "text": "hello from inside"}},
    {"id": "img", "modality": "image", "engine": {"type": "mock"}, "run_in": "gateway"},
]


@pytest.fixture
async def folded() -> AsyncIterator[httpx.AsyncClient]:
    settings = load_settings({"models": FOLDED})
    async with in_gateway_client(settings) as client:
        yield client


def _wav() -> bytes:
    t = np.arange(16000) / 16000
    return encode_audio((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000, "wav")


async def test_every_modality_is_served_from_inside_the_gateway(folded: Any) -> None:
    assert all(host.stats()["started"] for host in folded.hosted.hosts.values())  # loaded up front
    chat = await folded.post("/v1/chat/completions", json={
        "model": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"]
    emb = await folded.post("/v1/embeddings", json={"model": "emb", "input": ["a", "b c"]})
    assert emb.status_code == 200 and len(emb.json()["data"][1]["embedding"]) == 8
    speech = await folded.post("/v1/audio/speech", json={
        "model": "tts", "input": "one two", "response_format": "wav"})
    assert speech.status_code == 200 and speech.content[:4] == b"RIFF"
    text = await folded.post("/v1/audio/transcriptions", data={"model": "asr"},
                             files={"file": ("a.wav", _wav(), "audio/wav")})
    assert text.status_code == 200 and text.json()["text"] == "hello from inside"
    image = await folded.post("/v1/images/generations", json={"model": "img", "prompt": "a cat"})
    assert image.status_code == 200
    assert base64.b64decode(image.json()["data"][0]["b64_json"])[:4] == b"\x89PNG"
    health = {m["id"]: m for m in (await folded.get("/health")).json()["models"]}
    assert set(health) == {m["id"] for m in FOLDED}
    assert all(m["loaded"] and m["status"] != "unloaded" for m in health.values()), health


async def test_a_folded_model_unloads_its_engine_and_loads_again(folded: Any) -> None:
    r = await folded.post("/models/emb/unload")
    assert r.status_code == 200, r.text
    assert r.json()["loaded"] is False and r.json()["memory"]["loaded"] is False
    assert "hosted in the gateway" in r.json()["replicas"]
    assert folded.hosted.hosts["emb"].engine is None  # freed in this process
    refused = await folded.post("/v1/embeddings", json={"model": "emb", "input": "x"})
    assert refused.status_code == 409 and "POST /models/emb/load" in refused.text
    other = await folded.post("/v1/audio/speech", json={"model": "tts", "input": "still here"})
    assert other.status_code == 200  # the other folded models keep serving
    assert (await folded.post("/models/emb/load")).json()["loaded"] is True
    again = await folded.post("/v1/embeddings", json={"model": "emb", "input": "x"})
    assert again.status_code == 200


def test_folded_cpu_models_add_their_cpus_to_the_gateways() -> None:
    settings = load_settings({
        "models": [
            {"id": "emb", "modality": "embeddings", "run_in": "gateway",
             "engine": {"type": "sentence-transformers"},
             "deployment": {"ray_actor_options": {"num_cpus": 0.2}}},
            {"id": "mock", "engine": {"type": "mock"}, "run_in": "gateway"},  # computes nothing
            {"id": "own", "engine": {"type": "mock"},
             "deployment": {"ray_actor_options": {"num_cpus": 0.3}}},
        ],
        "gateway": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.25}},
        "metrics": {"actor_num_cpus": 0}, "session": {"actor_num_cpus": 0},
        "limits": {"actor_num_cpus": 0},
    })
    assert settings.gateway_num_cpus() == 0.45
    assert settings.cpus_at_start() == 2 * 0.45 + 0.3


@pytest.mark.parametrize("model,words", [
    ({"engine": {"type": "mock"}, "deployment": {"num_replicas": 2}}, "gateway.num_replicas"),
    ({"engine": {"type": "mock"}, "deployment": {"autoscaling": {"max_replicas": 3}}},
     "gateway.num_replicas"),
    ({"engine": {"type": "mock"}, "deployment": {"ray_actor_options": {"num_gpus": 1}}},
     "without an accelerator"),
    ({"engine": {"type": "vllm", "model": "m"},
      "deployment": {"ray_actor_options": {"num_gpus": 1}}}, "without an accelerator"),
    ({"engine": {"type": "vllm", "model": "m", "tensor_parallel_size": 2}},
     "without an accelerator"),
    ({"engine": {"type": "vllm", "model": "m"},
      "deployment": {"placement_group_bundles": [{"GPU": 1}]}}, "without an accelerator"),
])
def test_what_cannot_run_in_the_gateway_is_refused(model: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_settings({"models": [{"id": "m", "run_in": "gateway", **model}]})


def test_folded_torch_engines_agree_on_their_threads() -> None:
    def models(threads: int) -> list[dict[str, Any]]:
        return [
            {"id": "emb", "modality": "embeddings", "run_in": "gateway",
             "engine": {"type": "sentence-transformers", "num_threads": 1}},
            {"id": "img", "modality": "image", "run_in": "gateway",
             "engine": {"type": "gan", "num_threads": threads}},
        ]

    assert load_settings({"models": models(1)})
    with pytest.raises(ConfigError, match="num_threads must match"):
        load_settings({"models": models(2)})


def test_troupe_status_lists_models_hosted_in_the_gateway(monkeypatch: pytest.MonkeyPatch) -> None:
    from serve_app.cli import status

    gateway = {"status": "HEALTHY", "target_num_replicas": 1,
               "deployment_config": {"max_ongoing_requests": 1000,
                                     "ray_actor_options": {"num_cpus": 0.9}},
               "replicas": [{"state": "RUNNING", "node_ip": "127.0.0.1", "node_id": "abcdef0123"}]}
    details = {"applications": {"troupe": {"deployments": {"Gateway": gateway}}}}
    monkeypatch.setattr(status, "_serve_details", lambda: details)
    monkeypatch.setattr(status, "_placement_group_gpus", lambda: {})
    settings = load_settings({"models": FOLDED})
    queues = {"LLM_chat": {"queue_depth": 2.0, "running": 1.0, "expected_wait_s": 0.5}}
    rows = {r["deployment"]: r for r in status.collect_status(
        {"troupe": settings}, {"LLM_chat": 3.0}, queues)}
    assert set(rows) == {"Gateway"} | {f"{m.deployment_name}@Gateway" for m in settings.models}
    chat = rows["LLM_chat@Gateway"]
    assert chat["replicas"] == {"RUNNING": 1} and chat["status"] == "HEALTHY"
    assert chat["in_flight"] == 3.0 and chat["engine_queue"]["queue_depth"] == 2.0
    assert "troupe/LLM_chat@Gateway" in status.format_status(list(rows.values()))


async def test_the_metrics_actor_in_process_answers_like_the_ray_actor(tmp_path) -> None:
    """The recorder's sink, the gauge sink, and a span exporter's thread reach a
    MetricsActor kept in this process; its /metrics text counts what they sent."""
    import threading

    from actors.recorder import actor_gauge_sink, actor_sink
    from serve_app.build.actors import in_process_metrics
    from serve_app.protocol.metrics import RequestEvent

    settings = load_settings({"models": FOLDED, "metrics": {"serve_poll_interval_s": 0}})
    metrics = await in_process_metrics(settings, f"sqlite:///{tmp_path}/ledger.db")
    try:
        event = RequestEvent(event_id="e1", ts=1000.0, model="chat", route="/v1/chat/completions",
                             provider="local", e2e_ms=12.0, prompt_tokens=3, completion_tokens=4)
        assert await actor_sink(metrics)([event]) == 1
        assert await actor_sink(metrics)([event]) == 0  # a retried batch counts once
        await actor_gauge_sink(metrics, "gw")([("in_flight_requests", {"deployment": "LLM_chat"},
                                                2.0)])
        span = {"trace_id": "t1", "span_id": "s1", "name": "gateway", "start": 1.0, "end": 2.0}
        sent = []  # from the exporter's own thread, as the span processor calls it
        thread = threading.Thread(target=lambda: sent.append(metrics.record_spans.remote([span])))
        thread.start()
        thread.join()
        await asyncio.wait_for(asyncio.wrap_future(sent[0]), 5)
        text = (await metrics.prometheus.remote()).decode()
        assert 'troupe_requests_total{' in text and 'model="chat"' in text
        assert 'troupe_in_flight_requests{deployment="LLM_chat"} 2.0' in text
        assert [t["trace_id"] for t in await metrics.traces.remote()] == ["t1"]
    finally:
        await metrics.target.close()


async def test_a_capped_model_takes_its_max_ongoing_requests_and_the_rest_wait() -> None:
    """An in-gateway CPU model keeps its replica's cap: beyond it requests wait their turn
    (they are not refused), and managing the model (stats, unload) never waits."""
    from serve_app.build.local_handle import LocalHandle

    class Engine:
        def __init__(self) -> None:
            self.running, self.most = 0, 0
            self.release = asyncio.Event()

        async def generate(self, n: int) -> int:
            self.running += 1
            self.most = max(self.most, self.running)
            await self.release.wait()
            self.running -= 1
            return n

        def stats(self) -> dict[str, int]:
            return {"running": self.running}

    engine = Engine()
    handle = LocalHandle(engine, limit=asyncio.Semaphore(2))
    calls = [handle.generate.remote(i) for i in range(5)]
    await asyncio.wait_for(_until(lambda: engine.running == 2), 5)
    assert (await handle.stats.remote()) == {"running": 2}  # not held behind the cap
    engine.release.set()
    assert [await c for c in calls] == [0, 1, 2, 3, 4] and engine.most == 2
    settings = load_settings({"models": [
        {"id": "img", "modality": "image", "run_in": "gateway", "engine": {"type": "gan"},
         "deployment": {"max_ongoing_requests": 3}}]})
    assert InGatewayModels(settings).handles["img"]._limit._value == 3  # type: ignore[union-attr]


async def _until(condition: Any) -> None:
    while not condition():
        await asyncio.sleep(0)


async def test_a_model_waiting_for_its_conversion_loads_after_the_others(tmp_path) -> None:
    # A first `make run`: the bundled model's GGUF is still converting (nothing in this
    # cache yet), so the gateway loads the ready models meanwhile rather than after it.
    settings = load_settings({"models": [
        {"id": "smol", "engine": {"type": "transformers", "cache_dir": str(tmp_path)},
         "run_in": "gateway"},
        *FOLDED[:2]]})
    hosted = InGatewayModels(settings)
    order: list[str] = []

    def recorder(mid: str) -> Any:
        async def start() -> None:
            order.append(mid)
        return start

    for mid, host in hosted.hosts.items():
        host.start = recorder(mid)
    await hosted.start()
    assert order == ["chat", "emb", "smol"]

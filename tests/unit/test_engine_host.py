"""One engine host for every modality: the registry, the start timeout, load/unload of
text models, and load/unload of a model hosted in the gateway (``run_in: gateway``)."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Iterator

import pytest

from deployments.engines.registry import ENGINE_KINDS, create_engine, engine_class_path
from deployments.llm import LLMDeployment
from serve_app.errors import ModelNotLoaded, Timeout
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams
from serve_app.settings import MockEngineConfig, ModelConfig, TroupeSettings
from tests.fake_openai import FakeOpenAI
from tests.in_gateway import in_gateway_client

KEY_ENV = "TROUPE_TEST_ENGINE_HOST_KEY"


def test_one_registry_keyed_by_modality_and_engine_type() -> None:
    assert set(ENGINE_KINDS) == {"mock", "transformers", "vllm", "openai", "anthropic", "gemini"}
    # the same engine type names a different engine per modality
    assert engine_class_path("text", "openai").endswith(":OpenAITextEngine")
    assert engine_class_path("embeddings", "openai").endswith(":RemoteEmbeddingEngine")
    with pytest.raises(KeyError, match="no image engine of type 'vllm'"):
        engine_class_path("image", "vllm")
    model = ModelConfig.model_validate({"id": "e", "modality": "embeddings",
                                        "engine": {"type": "mock"}})
    assert type(create_engine("embeddings", "e", model.engine)).__name__ == "MockEmbeddingEngine"


class _SlowStart:
    context_length = 64
    shutdowns = 0

    async def start(self) -> None:
        await asyncio.sleep(10)

    def active_requests(self) -> int:
        return 0

    async def shutdown(self) -> None:
        self.shutdowns += 1


async def test_an_engine_that_does_not_start_in_time_is_a_timeout() -> None:
    dep = LLMDeployment(ModelConfig(id="slow", engine=MockEngineConfig()), engine=_SlowStart())
    dep.start_timeout_s = 0.05
    with pytest.raises(Timeout, match="did not start within 0.05s") as caught:
        await dep.start()
    assert caught.value.details == {"model": "slow", "phase": "start"}
    assert dep.stats()["started"] is False


def _request(rid: str) -> GenerationRequest:
    return GenerationRequest(rid, SamplingParams(max_tokens=4), [ChatMessage("user", "hi")])


async def test_text_deployment_unloads_and_loads_like_every_modality() -> None:
    dep = LLMDeployment(ModelConfig(id="m", engine=MockEngineConfig(token_delay_ms=0)))
    await dep.start()
    assert (await dep.complete(_request("a"))).finish_reason in ("stop", "length")
    freed = await dep.unload()
    assert freed["loaded"] is False and dep.engine is None
    assert dep.stats()["engine_loaded"] is False
    with pytest.raises(ModelNotLoaded, match="POST /models/m/load"):
        await dep.complete(_request("b"))
    assert (await dep.load())["loaded"] is True and dep.stats()["started"] is True
    assert (await dep.complete(_request("c"))).completion_tokens > 0
    await dep.shutdown()


# ------------------------------------------------------------- run_in: gateway


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
async def gateway_hosted(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    """A gateway whose only model runs inside it, built as the Gateway deployment does."""
    monkeypatch.setenv(KEY_ENV, "sk-engine-host")
    fake.reset()
    settings = TroupeSettings.model_validate({"models": [{
        "id": "gpt", "run_in": "gateway",
        "engine": {"type": "openai", "base_url": fake.url, "model": "gpt-4o-mini",
                   "api_key_env": KEY_ENV, "credential": "engine-host-test",
                   "retry": {"max_retries": 0}},
    }]})
    async with in_gateway_client(settings) as client:
        yield client


async def test_a_gateway_hosted_model_unloads_and_loads(gateway_hosted: Any) -> None:
    chat = {"model": "gpt", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    assert (await gateway_hosted.post("/v1/chat/completions", json=chat)).status_code == 200

    r = await gateway_hosted.post("/models/gpt/unload")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["loaded"] is False and body["memory"]["loaded"] is False
    assert body["replicas"] != 0  # no Serve deployment to scale: only the engine is freed
    assert await gateway_hosted.core.model_state.get_all() == {"gpt": False}
    refused = await gateway_hosted.post("/v1/chat/completions", json=chat)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "model_not_loaded"

    r = await gateway_hosted.post("/models/gpt/load")
    assert r.status_code == 200, r.text
    assert r.json()["loaded"] is True and r.json()["memory"]["loaded"] is True
    assert await gateway_hosted.core.model_state.get_all() == {"gpt": True}
    again = await gateway_hosted.post("/v1/chat/completions", json=chat)
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"]

"""A client's ``prompt_cache_key`` reaches remote providers that define it (OpenAI; Azure
when configured) and no other: the gateway in this process (no Ray) behind Starlette's test
client, the official ``openai`` client calling it, loopback provider fakes recording what
they receive."""

from __future__ import annotations

from typing import Any, Iterator

import openai
import pytest
from starlette.testclient import TestClient

from deployments.llm import LLMDeployment
from serve_app.build.app import build_fastapi_app
from serve_app.build.local_handle import LocalHandle
from serve_app.gateway.core import GatewayCore
from serve_app.settings import TroupeSettings
from tests.fake_openai import FakeOpenAI
from tests.fake_providers import FakeAnthropic, FakeGemini
from tests.remote_matrix import engine

KEY_ENV = "TROUPE_TEST_CACHE_KEY_UPSTREAM"
BASE = "http://gw"
#: model id -> (provider in tests/remote_matrix.py, engine overrides)
MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "m-openai": ("openai", {}),
    "m-openai-off": ("openai", {"prompt_cache_key": False}),
    "m-azure": ("azure", {}),
    "m-azure-on": ("azure", {"prompt_cache_key": True}),
    "m-anthropic": ("anthropic", {}),
    "m-gemini": ("gemini", {}),
}


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, "k-cache-key")
    with FakeOpenAI() as oai, FakeAnthropic() as claude, FakeGemini() as gem:
        yield {"openai": oai, "azure": oai, "anthropic": claude, "gemini": gem}
    mp.undo()


@pytest.fixture(scope="module")
def client(fakes: dict[str, Any]) -> Iterator[openai.OpenAI]:
    settings = TroupeSettings.model_validate({"models": [
        {"id": mid, "engine": {**engine(provider, fakes, KEY_ENV), **overrides}}
        for mid, (provider, overrides) in MODELS.items()]})
    deployments = {m.id: LLMDeployment(m) for m in settings.models}
    core = GatewayCore(settings, {k: LocalHandle(v) for k, v in deployments.items()},
                       record=lambda event: None)
    with TestClient(build_fastapi_app(core), base_url=BASE) as tc:
        yield openai.OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0,
                            http_client=tc)
        for deployment in deployments.values():
            tc.portal.call(deployment.shutdown)  # on the app's loop, where they started


def upstream_body(fakes: dict[str, Any], model: str) -> dict[str, Any]:
    """The body of the last generation request the model's provider received."""
    recorded = [r for r in fakes[MODELS[model][0]].requests if r.method == "POST"]
    return recorded[-1].body


@pytest.mark.parametrize("model, forwarded", [
    ("m-openai", True), ("m-openai-off", False), ("m-azure", False), ("m-azure-on", True),
    ("m-anthropic", False), ("m-gemini", False)])
def test_chat_completions_forward_the_key_where_the_provider_takes_it(
        client: openai.OpenAI, fakes: dict[str, Any], model: str, forwarded: bool) -> None:
    completion = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=4,
        prompt_cache_key="user-7")
    assert completion.choices[0].message.content
    body = upstream_body(fakes, model)
    assert ("prompt_cache_key" in body) is forwarded, body
    if forwarded:
        assert body["prompt_cache_key"] == "user-7"


def test_responses_forward_the_key_and_requests_without_one_send_none(
        client: openai.OpenAI, fakes: dict[str, Any]) -> None:
    response = client.responses.create(model="m-openai", input="hello", max_output_tokens=16,
                                       prompt_cache_key="trip-42")
    assert response.output_text
    assert upstream_body(fakes, "m-openai")["prompt_cache_key"] == "trip-42"
    client.chat.completions.create(model="m-openai", max_tokens=4,
                                   messages=[{"role": "user", "content": "hello"}])
    assert "prompt_cache_key" not in upstream_body(fakes, "m-openai")

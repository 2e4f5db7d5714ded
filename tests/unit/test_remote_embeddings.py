"""Remote embeddings: the embeddings deployment over a remote provider's embeddings API,
against the real fake OpenAI upstream on loopback (no Ray)."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import pytest

from deployments.embeddings import EmbeddingDeployment
from deployments.engines.remote import breaker
from deployments.engines.remote.embeddings import RemoteEmbeddingEngine, _split_tokens
from serve_app.settings import ConfigError, load_settings
from serve_app.errors import InvalidRequest, RateLimitExceeded
from serve_app.protocol.modalities import EmbeddingRequest
from tests.fake_openai import FakeOpenAI, fake_embedding

KEY_ENV = "TROUPE_TEST_REMOTE_EMBED_KEY"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.reset()
    monkeypatch.setenv(KEY_ENV, "sk-test-remote-embed-0123456789")
    breaker._BREAKERS.clear()


def model(fake: FakeOpenAI, **engine: Any) -> dict[str, Any]:
    return {"id": "remote-embed", "modality": "embeddings",
            "engine": {"type": "openai", "base_url": fake.url, "model": "text-embedding-3-small",
                       "api_key_env": KEY_ENV, "retry": {"max_retries": 0}, **engine}}


def vectors(result: Any) -> np.ndarray:
    return np.stack([np.frombuffer(v, dtype="<f4") for v in result.vectors])


async def test_a_batch_of_callers_is_one_upstream_call_with_provider_vectors(fake: FakeOpenAI) -> None:
    dep = EmbeddingDeployment(load_settings({"models": [model(fake)]}).models[0])
    await dep.start()
    try:
        texts = ["the cat sat", "a dog barked loudly today"]
        results = await dep.embed_batch([EmbeddingRequest("r1", [texts[0]]),
                                         EmbeddingRequest("r2", [texts[1]])])
    finally:
        await dep.shutdown()
    calls = [r for r in fake.requests if r.path.endswith("/embeddings")]
    assert len(calls) == 1 and calls[0].body["input"] == texts
    assert calls[0].body["model"] == "text-embedding-3-small"
    for result, text in zip(results, texts):
        want = np.asarray(fake_embedding(text), dtype=np.float32)
        np.testing.assert_allclose(vectors(result)[0], want / np.linalg.norm(want), rtol=1e-5)
        assert result.dimensions == 8
    # The fake reports 3 + 5 prompt tokens for the batch: split back per caller.
    assert [r.prompt_tokens for r in results] == _split_tokens(8, texts)
    assert sum(r.prompt_tokens for r in results) == 8


async def test_upstream_errors_keep_their_meaning(fake: FakeOpenAI) -> None:
    fake.enqueue(status=429, retry_after="7", error_code="rate_limit_exceeded")
    dep = EmbeddingDeployment(load_settings({"models": [model(fake)]}).models[0])
    await dep.start()
    try:
        with pytest.raises(RateLimitExceeded) as info:
            await dep.embed(EmbeddingRequest("r1", ["hello"]))
    finally:
        await dep.shutdown()
    assert info.value.retry_after_s == 7


async def test_token_arrays_are_refused_for_a_remote_tokenizer(fake: FakeOpenAI) -> None:
    dep = EmbeddingDeployment(load_settings({"models": [model(fake)]}).models[0])
    await dep.start()
    try:
        with pytest.raises(InvalidRequest) as info:
            await dep.embed(EmbeddingRequest("r1", [[1, 2, 3]]))
    finally:
        await dep.shutdown()
    assert "token array" in str(info.value) and not fake.requests


def test_only_providers_with_an_embeddings_api_fit_the_modality() -> None:
    with pytest.raises(ConfigError, match="engines for 'embeddings'.*openai, gemini"):
        load_settings({"models": [{"id": "e", "modality": "embeddings",
                                   "engine": {"type": "anthropic", "model": "claude"}}]})
    # a remote embeddings model may run inside the gateway (no hop to a replica of its own)
    assert load_settings({"models": [{"id": "e", "modality": "embeddings", "run_in": "gateway",
                                      "engine": {"type": "openai", "model": "m"}}]})
    engine = RemoteEmbeddingEngine("g", load_settings({"models": [{
        "id": "g", "modality": "embeddings",
        "engine": {"type": "gemini", "model": "text-embedding-004"}}]}).models[0].engine)
    assert engine.count_tokens(["abcdefgh"]) == [2]


def test_split_tokens_sums_to_the_total() -> None:
    assert _split_tokens(0, ["a", "b"]) == [0, 0]
    assert sum(_split_tokens(10, ["a", "bbb", "cc"])) == 10

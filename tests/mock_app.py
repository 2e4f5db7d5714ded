"""The shared test app: a real Ray Serve app with mock engines on a random loopback port.

Ray starts once per test session (``ray.init(address="local")``: never an existing
cluster); the Troupe app is deployed once and every integration module talks to it
over HTTP and WebSocket on 127.0.0.1.
"""

from __future__ import annotations

from typing import Any, Iterator

import httpx
import pytest

MOCK_MODELS: list[dict[str, Any]] = [
    {
        # Natural answers of 64-96 tokens, so a smaller max_tokens always ends in "length".
        "id": "mock-5ms",
        "engine": {"type": "mock", "token_delay_ms": 5, "min_output_tokens": 64,
                   "max_output_tokens": 96},
        "deployment": {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.1}},
        "pricing": {"input_usd_per_million": 0.5, "output_usd_per_million": 1.5},
    },
    {
        # Long answers, slow tokens: requests are still running when a test cancels them.
        "id": "mock-slow",
        "engine": {"type": "mock", "token_delay_ms": 40, "min_output_tokens": 400,
                   "max_output_tokens": 500},
        "default_max_tokens": 500,
        "deployment": {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.1}},
    },
    {
        "id": "mock-fail",
        "engine": {"type": "mock", "token_delay_ms": 2, "fail_after_tokens": 3,
                   "min_output_tokens": 20, "max_output_tokens": 20},
        "deployment": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.1}},
    },
    {
        "id": "mock-small-ctx",
        "engine": {"type": "mock", "token_delay_ms": 1, "context_length": 32},
        "deployment": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.1}},
    },
    # The other modalities (mock engines; tests/integration/test_modalities.py).
    {
        # 20 ms per forward pass, so concurrent callers pile up and Serve batches them.
        "id": "mock-embeddings",
        "modality": "embeddings",
        "engine": {"type": "mock", "dimensions": 384, "delay_ms": 20, "max_batch_size": 32,
                   "batch_wait_timeout_s": 0.01},
        "deployment": {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.05}},
    },
    {
        "id": "mock-speech",
        "modality": "speech",
        "engine": {"type": "mock"},
        "deployment": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.05}},
    },
    {
        "id": "mock-transcription",
        "modality": "transcription",
        "engine": {"type": "mock", "text": "hello from the mock transcriber"},
        "deployment": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.05}},
    },
    {
        "id": "mock-image",
        "modality": "image",
        "engine": {"type": "mock"},
        "deployment": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.05}},
    },
]

APP_ARGS: dict[str, Any] = {
    "models": MOCK_MODELS,
    "gateway": {"ray_actor_options": {"num_cpus": 0.2}, "max_body_bytes": 65536},
}


@pytest.fixture(scope="session")
def ledger_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.mktemp("state") / "ledger.db")


@pytest.fixture(scope="session")
def fake_openai() -> Iterator[Any]:
    """A real OpenAI-shaped upstream on loopback, behind the "remote-gpt" model."""
    from tests.conftest import FAKE_OPENAI_KEY
    from tests.fake_openai import FakeOpenAI

    with FakeOpenAI(expected_api_key=FAKE_OPENAI_KEY) as fake:
        yield fake


@pytest.fixture(scope="session")
def base_url(serve_instance: int, ledger_path: str, fake_openai: Any) -> str:
    """The Troupe app with the mock models, deployed once (metrics ledger in a tmp dir)."""
    from ray import serve

    from serve_app.build.app import build_app

    remote = {
        "id": "remote-gpt",
        "engine": {"type": "openai", "base_url": fake_openai.url, "model": "gpt-4o-mini",
                   "api_key_env": "TROUPE_TEST_OPENAI_KEY"},
        "deployment": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.1}},
    }
    remote_embed = {  # the same upstream's embeddings API, batched across callers
        "id": "remote-embed", "modality": "embeddings",
        "engine": {"type": "openai", "base_url": fake_openai.url,
                   "model": "text-embedding-3-small", "api_key_env": "TROUPE_TEST_OPENAI_KEY"},
        "deployment": {"max_ongoing_requests": 16, "ray_actor_options": {"num_cpus": 0.05}},
    }
    args = {
        **APP_ARGS,
        "models": [*MOCK_MODELS, remote, remote_embed],
        "metrics": {"store_url": "sqlite:///" + ledger_path.lstrip("/"), "flush_interval_s": 0.1,
                    "serve_poll_interval_s": 1.0},
        "tracing": {"export_interval_ms": 200},
    }
    # external_scaler_enabled, as in config/local.yaml: unload removes replicas
    serve.run(build_app(args), name="troupe", route_prefix="/", external_scaler_enabled=True)
    url = f"http://127.0.0.1:{serve_instance}"
    r = httpx.get(url + "/health", timeout=30)
    assert r.status_code == 200, r.text
    return url


@pytest.fixture()
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        yield client


def engine_active(client: httpx.Client, model_id: str) -> int:
    """Engine-side active requests of one model, as /health reports them."""
    body = client.get("/health").json()
    for model in body["models"]:
        if model["id"] == model_id:
            return model["active_requests"]
    raise KeyError(model_id)

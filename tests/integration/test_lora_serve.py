"""LoRA adapters through real Serve: model multiplexing keeps an adapter's requests on the
replica that holds it, and usage is metered per adapter (mock engine, two replicas)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

PREFIX = "/lora"


def adapter_folder(path: Path) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "base_model_name_or_path": "lora-mock",
         "target_modules": ["q_proj", "v_proj"]}))
    (path / "adapter_model.safetensors").write_bytes(b"\0")
    return str(path)


@pytest.fixture(scope="module")
def url(serve_instance: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serve_app.build.app import build_app

    root = tmp_path_factory.mktemp("adapters")
    for name in ("a", "b", "c"):
        adapter_folder(root / name)
    args = {
        "models": [{
            "id": "lora-mock",
            "engine": {"type": "mock", "token_delay_ms": 0, "adapter_load_delay_ms": 50},
            "adapters": {"folder": str(root), "max_loaded": 2},
            "deployment": {"num_replicas": 2, "max_ongoing_requests": 8,
                           "ray_actor_options": {"num_cpus": 0.05}},
        }],
        "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
        "metrics": {"store_url": "sqlite:///" + str(root / "state.db").lstrip("/"),
                    "flush_interval_s": 0.1, "serve_poll_interval_s": 0},
    }
    serve.run(build_app(args), name="lora", route_prefix=PREFIX)
    try:
        yield f"http://127.0.0.1:{serve_instance}{PREFIX}"
    finally:
        serve.delete("lora")


@pytest.fixture()
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=30) as client:
        yield client


def chat(client: httpx.Client, model: str) -> httpx.Response:
    response = client.post("/v1/chat/completions", json={
        "model": model, "temperature": 0, "max_tokens": 6,
        "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 200, response.text
    return response


@pytest.mark.xfail(
    strict=False,
    reason="Serve's router learns a replica's multiplexed model ids asynchronously: a request "
    "sent right after an adapter's first load can land on the other replica and load it there "
    "too (seen once in a full-suite run; passes alone). Issue 19 stays open on this.",
)
def test_requests_for_an_adapter_stay_on_the_replica_that_holds_it(http: httpx.Client) -> None:
    first = {a: chat(http, f"lora-mock:{a}") for a in ("a", "b")}
    replicas: dict[str, set[str]] = {"a": set(), "b": set()}
    texts: dict[str, set[str]] = {"a": set(), "b": set()}
    for _ in range(10):
        for adapter in ("a", "b"):
            response = chat(http, f"lora-mock:{adapter}")
            replicas[adapter].add(response.headers["x-troupe-replica"])
            texts[adapter].add(response.json()["choices"][0]["message"]["content"])
    # Random routing over two replicas would split 10 requests with odds 1 - 2**-9.
    for adapter in ("a", "b"):
        assert replicas[adapter] == {first[adapter].headers["x-troupe-replica"]}, replicas
        assert len(texts[adapter]) == 1
    assert texts["a"] != texts["b"]


def test_adapters_are_listed_with_their_base(http: httpx.Client) -> None:
    cards = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert {"lora-mock:a", "lora-mock:b", "lora-mock:c"} <= set(cards)
    assert cards["lora-mock:c"]["parent"] == "lora-mock"


def test_an_unknown_adapter_is_a_404_listing_the_known_ones(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json={
        "model": "lora-mock:nope", "messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 404
    assert "a, b, c" in response.json()["error"]["message"]


def test_usage_and_adapter_load_time_are_metered_per_adapter(http: httpx.Client) -> None:
    chat(http, "lora-mock:c")
    deadline = time.monotonic() + 20
    usage: dict[str, Any] = {}
    while time.monotonic() < deadline:
        body = http.get("/v1/usage", params={"group_by": "model"}).json()
        usage = {row["group"]: row for row in body.get("groups", [])}
        if "lora-mock:c" in usage:
            break
        time.sleep(0.2)
    assert usage["lora-mock:c"]["completion_tokens"] > 0, usage
    assert usage["lora-mock:c"]["latency_ms"]["e2e"]
    metrics = http.get("/metrics").text
    assert 'troupe_adapter_load_seconds_count{model="lora-mock:c"' in metrics

"""LoRA adapters through real Serve: model multiplexing keeps an adapter's requests on the
replica that holds it, admin routes register and drop adapters at run time, and usage is
metered per adapter (mock engine, two model replicas)."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import pytest

from tests.conftest import wait_until

PREFIX = "/lora"
ADMIN_ENV = "TROUPE_TEST_LORA_ADMIN_KEY"
ADMIN = {"Authorization": "Bearer adm-test-lora-0123456789"}
# Read by the gateway replica: set at import, before the session's Ray starts.
os.environ[ADMIN_ENV] = ADMIN["Authorization"][7:]


def adapter_folder(path: Path) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "base_model_name_or_path": "lora-mock",
         "target_modules": ["q_proj", "v_proj"]}))
    (path / "adapter_model.safetensors").write_bytes(b"\0")
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="module")
def url(serve_instance: int, root: Path) -> Iterator[str]:
    from ray import serve

    from serve_app.build.app import build_app

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
        "gateway": {"ray_actor_options": {"num_cpus": 0.1}, "admin_key_env": ADMIN_ENV},
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


def placement(client: httpx.Client) -> dict[str, list[str]]:
    """Adapter -> the replicas the gateway's Serve router knows hold it (admin listing)."""
    listing = client.get("/models/lora-mock/adapters", headers=ADMIN)
    assert listing.status_code == 200, listing.text
    return {card["adapter"]: card["replicas"] for card in listing.json()["data"]}


def test_requests_for_an_adapter_stay_on_the_replica_that_holds_it(http: httpx.Client) -> None:
    holders: dict[str, str] = {}
    for adapter in ("a", "b"):
        holders[adapter] = chat(http, f"lora-mock:{adapter}").headers["x-troupe-replica"]
        # Serve's router learns a replica's adapters asynchronously (replica -> controller
        # -> router); until it has them a request may load the adapter on the other replica.
        wait_until(lambda a=adapter: placement(http).get(a) == [holders[a]], timeout=30)
    assert holders["a"] != holders["b"]  # "b" went to the replica holding fewer adapters
    replicas: dict[str, set[str]] = {"a": set(), "b": set()}
    texts: dict[str, set[str]] = {"a": set(), "b": set()}
    for _ in range(10):
        for adapter in ("a", "b"):
            response = chat(http, f"lora-mock:{adapter}")
            replicas[adapter].add(response.headers["x-troupe-replica"])
            texts[adapter].add(response.json()["choices"][0]["message"]["content"])
    # Random routing over two replicas would keep 10 requests on one with odds 2**-9.
    assert replicas == {"a": {holders["a"]}, "b": {holders["b"]}}
    assert placement(http) == {"a": [holders["a"]], "b": [holders["b"]], "c": []}  # no copies
    assert len(texts["a"]) == len(texts["b"]) == 1
    assert texts["a"] != texts["b"]


def test_an_adapter_registered_at_run_time_serves_then_is_dropped(
    http: httpx.Client, root: Path
) -> None:
    path = adapter_folder(root.parent / "late-adapters" / "late")
    created = http.post("/models/lora-mock/adapters", headers=ADMIN,
                        json={"id": "late", "path": path})
    assert created.status_code == 201, created.text
    assert created.json()["parent"] == "lora-mock"
    answer = chat(http, "lora-mock:late").json()["choices"][0]["message"]["content"]
    assert answer and chat(http, "late").json()["choices"][0]["message"]["content"] == answer
    with sqlite3.connect(root / "state.db") as db:  # kept in the store: a redeploy keeps it
        rows = db.execute("SELECT base, adapter_id, path FROM adapters").fetchall()
    assert rows == [("lora-mock", "late", path)]

    dropped = http.delete("/models/lora-mock/adapters/late", headers=ADMIN)
    assert dropped.status_code == 200 and dropped.json() == {"id": "lora-mock:late", "deleted": True}
    gone = http.post("/v1/chat/completions", json={
        "model": "lora-mock:late", "messages": [{"role": "user", "content": "hi"}]})
    assert gone.status_code == 404
    assert "Known adapters: a, b, c." in gone.json()["error"]["message"]
    with sqlite3.connect(root / "state.db") as db:
        assert db.execute("SELECT count(*) FROM adapters").fetchone() == (0,)
    assert "lora-mock:late" not in {m["id"] for m in http.get("/v1/models").json()["data"]}


def test_a_registration_for_another_base_is_a_400_and_needs_the_admin_key(
    http: httpx.Client, root: Path
) -> None:
    path = adapter_folder(root.parent / "other-base" / "x")
    config = Path(path) / "adapter_config.json"
    config.write_text(config.read_text().replace('"lora-mock"', '"some-other-model"'))
    body = {"id": "x", "path": path}
    assert http.post("/models/lora-mock/adapters", json=body).status_code == 401
    wrong = http.post("/models/lora-mock/adapters", headers=ADMIN, json=body)
    assert wrong.status_code == 400, wrong.text
    assert wrong.json()["error"]["code"] == "ADAPTER_INVALID"
    assert "some-other-model" in wrong.json()["error"]["message"]


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
    """Ledger (via /v1/usage), Prometheus counters and the load-time histogram, per adapter."""
    chat(http, "lora-mock:c")

    def usage() -> Optional[dict[str, Any]]:  # once the ledger has booked the request
        body = http.get("/v1/usage", params={"group_by": "model"}).json()
        rows = {row["group"]: row for row in body.get("groups", [])}
        return rows if "lora-mock:c" in rows else None

    rows = wait_until(usage, timeout=20)
    assert rows["lora-mock:c"]["completion_tokens"] > 0, rows
    assert rows["lora-mock:c"]["latency_ms"]["e2e"]
    assert "lora-mock" not in rows  # adapter traffic is never booked on the bare base
    metrics = http.get("/metrics").text
    assert 'troupe_adapter_load_seconds_count{model="lora-mock:c"' in metrics
    assert any(line.startswith("troupe_requests") and 'model="lora-mock:c"' in line
               for line in metrics.splitlines()), metrics[:2000]

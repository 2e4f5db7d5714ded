"""An adapter registered on one gateway replica reaches the others at once, through real
Serve: two gateway replicas behind Serve's proxy, one mock text replica.

A registration (or a drop) touches the model-state actor; every gateway replica follows
its long poll and re-reads the store, well before its next health check (every 10 s).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import httpx
import pytest

from tests.conftest import wait_until

PREFIX = "/lora-gw"
ADMIN_ENV = "TROUPE_TEST_LORA_GW_ADMIN_KEY"
ADMIN = {"Authorization": "Bearer adm-test-lora-gw-0123456789"}
# Read by the gateway replicas: set at import, before the session's Ray starts.
os.environ[ADMIN_ENV] = ADMIN["Authorization"][7:]
#: Well under the gateway's 10 s health-check period, which would re-read the store too.
PROMPT_S = 3.0


def adapter_folder(path: Path) -> str:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "base_model_name_or_path": "gw-mock",
         "target_modules": ["q_proj", "v_proj"]}))
    (path / "adapter_model.safetensors").write_bytes(b"\0")
    return str(path)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora-gw")


@pytest.fixture(scope="module")
def http(serve_instance: int, root: Path) -> Iterator[httpx.Client]:
    from ray import serve

    from serve_app.build.app import build_app

    args = {
        "models": [{
            "id": "gw-mock",
            "engine": {"type": "mock", "token_delay_ms": 0},
            "adapters": {"max_loaded": 2},
            "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.05}},
        }],
        "gateway": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0.05},
                    "admin_key_env": ADMIN_ENV},
        "metrics": {"store_url": "sqlite:///" + str(root / "state.db").lstrip("/"),
                    "serve_poll_interval_s": 0},
    }
    serve.run(build_app(args), name="lora-gw", route_prefix=PREFIX)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{serve_instance}{PREFIX}",
                          timeout=30) as client:
            yield client
    finally:
        serve.delete("lora-gw")


def statuses(http: httpx.Client, model: str, n: int = 8) -> set[int]:
    """Status codes of ``n`` requests; Serve's proxy spreads them over both gateways."""
    return {http.post("/v1/chat/completions", json={
        "model": model, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
    }).status_code for _ in range(n)}


def test_a_registration_and_a_drop_reach_every_gateway_replica_promptly(
    http: httpx.Client, root: Path
) -> None:
    assert statuses(http, "gw-mock:late") == {404}
    created = http.post("/models/gw-mock/adapters", headers=ADMIN,
                        json={"id": "late", "path": adapter_folder(root / "late")})
    assert created.status_code == 201, created.text
    wait_until(lambda: statuses(http, "gw-mock:late") == {200}, timeout=PROMPT_S)
    assert http.delete("/models/gw-mock/adapters/late", headers=ADMIN).status_code == 200
    wait_until(lambda: statuses(http, "gw-mock:late") == {404}, timeout=PROMPT_S)

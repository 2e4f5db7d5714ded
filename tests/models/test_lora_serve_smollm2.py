"""LoRA adapters on the bundled SmolLM2 through real Serve, as a user calls them.

The transformers CPU engine (bfloat16 weights, the default for a model with adapters)
serves three seeded peft adapters from tests/lora_fixtures.py behind the gateway, with
room for two on its one replica. Over HTTP with the official openai client: at
temperature 0 each adapter answers differently from the base model and from the other,
and the same on every call; a third adapter evicts the least recently used one, which
reloads and answers as before (Serve's multiplexer keeps the LRU; /health shows it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
from openai import OpenAI

from tests.lora_fixtures import build_smollm2_adapters

pytestmark = pytest.mark.models

PREFIX = "/lora-smollm2"
QUESTION = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def url(serve_instance: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from ray import serve

    from serve_app.build.app import build_app

    root: Path = tmp_path_factory.mktemp("lora-smollm2")
    paths = build_smollm2_adapters(root, ["one", "two", "three"])
    args = {
        "models": [{
            "id": "smollm2",
            "engine": {"type": "transformers", "num_threads": 1, "weights": "bfloat16"},
            "adapters": {"paths": paths, "max_loaded": 2, "max_rank": 8},
            "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}},
        }],
        "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
        "metrics": {"store_url": "sqlite:///" + str(root / "state.db").lstrip("/"),
                    "serve_poll_interval_s": 0},
    }
    serve.run(build_app(args), name="lora-smollm2", route_prefix=PREFIX)
    try:
        yield f"http://127.0.0.1:{serve_instance}{PREFIX}"
    finally:
        serve.delete("lora-smollm2")  # its replica's CPU goes back to the next module's app


@pytest.fixture(scope="module")
def client(url: str) -> OpenAI:
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def answer(client: OpenAI, model: str) -> str:
    reply = client.chat.completions.create(
        model=model, messages=QUESTION, temperature=0, max_tokens=12)
    assert reply.model == model
    text = reply.choices[0].message.content
    assert text
    return text


def adapters_on_the_replica(url: str) -> dict[str, Any]:
    health = httpx.get(url + "/health", timeout=30).json()
    return next(m["adapters"] for m in health["models"] if m["id"] == "smollm2")


def test_each_adapter_answers_its_own_way_and_the_same_every_time(client: OpenAI) -> None:
    base, one, two = (answer(client, m) for m in ("smollm2", "smollm2:one", "smollm2:two"))
    assert len({base, one, two}) == 3, (base, one, two)
    for _ in range(2):
        assert answer(client, "smollm2:one") == one
        assert answer(client, "two") == two  # the adapter's own id selects it too
        assert answer(client, "smollm2") == base  # the base model is untouched
    listed = {m.id: m for m in client.models.list()}
    assert {"smollm2:one", "smollm2:two", "smollm2:three"} <= set(listed)
    assert listed["smollm2:three"].model_extra["parent"] == "smollm2"


def test_a_third_adapter_evicts_the_least_recent_which_reloads_the_same(
    client: OpenAI, url: str
) -> None:
    first = {a: answer(client, f"smollm2:{a}") for a in ("one", "two")}  # both held now
    before = adapters_on_the_replica(url)
    assert before["loaded"] == ["one", "two"], before
    three = answer(client, "smollm2:three")  # room for two: "one" (least recent) goes
    assert adapters_on_the_replica(url)["loaded"] == ["three", "two"]
    assert answer(client, "smollm2:one") == first["one"]  # reloaded; "two" goes
    after = adapters_on_the_replica(url)
    assert after["loaded"] == ["one", "three"]
    assert after["loads"] == before["loads"] + 2
    assert after["evictions"] == before["evictions"] + 2
    assert three not in first.values()

"""LoRA adapters without Ray: settings, folder checks, the replica's LRU, and the gateway's
routes over in-process handles (mock engine: an adapter changes its output like a real one).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest

from deployments.adapter_files import inspect_adapter, scan_adapter_folder
from deployments.adapters import AdapterSlots, LocalMultiplexer
from deployments.llm import LLMDeployment
from serve_app.build.app import build_fastapi_app
from serve_app.build.local_handle import LocalHandle
from serve_app.errors import AdapterInvalid
from serve_app.gateway.core import GatewayCore
from serve_app.pricing import PriceTable
from serve_app.protocol.metrics import RequestEvent
from serve_app.settings import ConfigError, load_settings

ADMIN = {"Authorization": "Bearer admin-secret"}


def make_adapter(folder: Path, rank: int = 4, base: str = "mock") -> str:
    """A folder that passes the checks (the mock engine reads no weights)."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "base_model_name_or_path": base,
         "target_modules": ["q_proj", "v_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(b"\0")
    return str(folder)


# --------------------------------------------------------------------- settings


def test_adapter_ids_with_a_colon_are_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match="adapters.paths"):
        load_settings({"models": [{"id": "m", "engine": {"type": "mock"},
                                   "adapters": {"paths": {"a:b": "/x"}}}]})


def test_adapters_on_a_remote_engine_are_refused() -> None:
    with pytest.raises(ConfigError, match="local text engines"):
        load_settings({"models": [{"id": "m", "engine": {"type": "openai", "model": "gpt-4o-mini"},
                                   "adapters": {"paths": {"a": "/x"}}}]})


# ----------------------------------------------------------------- folder checks


def test_inspect_reads_rank_base_and_modules(tmp_path: Path) -> None:
    info = inspect_adapter(make_adapter(tmp_path / "a", rank=8), 16, ["mock"])
    assert (info.rank, info.base_model, info.target_modules) == (8, "mock", ("q_proj", "v_proj"))


@pytest.mark.parametrize("case, message", [
    ("missing", "not an adapter folder"),
    ("no-weights", "has no weights"),
    ("rank", "rank 32"),
    ("base", "trained on 'org/other-model'"),
])
def test_bad_adapter_folders_say_what_is_wrong(tmp_path: Path, case: str, message: str) -> None:
    path = str(tmp_path / "nothing-here")
    if case == "no-weights":
        path = make_adapter(tmp_path / "a")
        (tmp_path / "a" / "adapter_model.safetensors").unlink()
    elif case == "rank":
        path = make_adapter(tmp_path / "a", rank=32)
    elif case == "base":
        path = make_adapter(tmp_path / "a", base="org/other-model")
    with pytest.raises(AdapterInvalid, match=message) as caught:
        inspect_adapter(path, 16, ["mock"], "a")
    assert caught.value.status == 400


def test_folder_scan_finds_adapter_subfolders(tmp_path: Path) -> None:
    make_adapter(tmp_path / "one")
    make_adapter(tmp_path / "two")
    (tmp_path / "not-an-adapter").mkdir()
    assert sorted(scan_adapter_folder(str(tmp_path))) == ["one", "two"]


# ------------------------------------------------------------- replica LRU


class CountingEngine:
    """Records adapter loads and unloads (what a real engine would do to its weights)."""

    def __init__(self) -> None:
        self.loaded: set[str] = set()
        self.log: list[str] = []

    async def load_adapter(self, adapter_id: str, path: str) -> None:
        self.loaded.add(adapter_id)
        self.log.append(f"+{adapter_id}")

    async def unload_adapter(self, adapter_id: str) -> None:
        self.loaded.discard(adapter_id)
        self.log.append(f"-{adapter_id}")


def slots_over(engine: CountingEngine, capacity: int = 2) -> AdapterSlots:
    slots = AdapterSlots(lambda: engine, {a: f"/adapters/{a}" for a in "abc"})
    slots.get = LocalMultiplexer(slots.load, capacity)
    return slots


async def test_three_adapters_with_room_for_two_evict_the_least_recently_used() -> None:
    engine = CountingEngine()
    slots = slots_over(engine)
    for adapter in ["a", "b", "a", "c", "b"]:
        await slots.acquire(adapter, None)
        await slots.release(adapter)
    # a, b loaded; a used again; c evicts b (least recent); b comes back and evicts a.
    # Like Serve's multiplexer, the evicted one goes before the new one loads.
    assert engine.log == ["+a", "+b", "-b", "+c", "-a", "+b"]
    assert engine.loaded == {"b", "c"}
    assert slots.stats() == {"loaded": ["b", "c"], "loads": 4, "evictions": 2}


async def test_an_adapter_in_use_is_unloaded_only_when_its_last_request_ends() -> None:
    engine = CountingEngine()
    slots = slots_over(engine, capacity=1)
    await slots.acquire("a", None)  # a request is running on a
    await slots.acquire("b", None)  # evicts a from the LRU...
    assert engine.loaded == {"a", "b"}  # ...but a stays in the engine while in use
    await slots.release("a")
    assert engine.loaded == {"b"}


async def test_first_request_reports_the_load_time_later_ones_none() -> None:
    slots = slots_over(CountingEngine())
    _, first = await slots.acquire("a", None)
    _, second = await slots.acquire("a", None)
    assert first is not None and first >= 0 and second is None


def test_an_adapter_costs_what_its_base_costs() -> None:
    table = PriceTable({"mock": {"input_usd_per_million": 1.0, "output_usd_per_million": 2.0}})
    entry = table.price(RequestEvent("r1", 0.0, "mock:a", "/v1/chat/completions",
                                     prompt_tokens=1_000_000, completion_tokens=1_000_000))
    assert entry.cost_usd == pytest.approx(3.0)


# ------------------------------------------------------------------- gateway


class Gateway:
    """The app over one mock model with adapters a and b, behind an in-process handle."""

    def __init__(self, tmp_path: Path, **adapters: Any) -> None:
        paths = {name: make_adapter(tmp_path / name) for name in ("a", "b")}
        settings = load_settings({"models": [
            {"id": "mock", "engine": {"type": "mock", "token_delay_ms": 0},
             "adapters": {"paths": paths, **adapters}},
            {"id": "plain", "engine": {"type": "mock", "token_delay_ms": 0}},
        ]})
        self.events: list[RequestEvent] = []
        self.deployment = LLMDeployment(settings.models[0])
        handles = {"mock": LocalHandle(self.deployment),
                   "plain": LocalHandle(LLMDeployment(settings.models[1]))}
        self.core = GatewayCore(settings, handles, record=self.events.append)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=build_fastapi_app(self.core)),
                                        base_url="http://troupe.test")

    async def chat(self, model: str) -> httpx.Response:
        return await self.client.post("/v1/chat/completions", json={
            "model": model, "temperature": 0, "max_tokens": 12,
            "messages": [{"role": "user", "content": "Say something."}]})


@pytest.fixture
async def gw(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Gateway]:
    monkeypatch.setenv("TROUPE_ADMIN_KEY", "admin-secret")
    gateway = Gateway(tmp_path)
    yield gateway
    await gateway.client.aclose()


def text_of(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


async def test_each_adapter_answers_differently_and_the_same_every_time(gw: Gateway) -> None:
    base, a, b = [text_of(await gw.chat(m)) for m in ("mock", "mock:a", "mock:b")]
    assert len({base, a, b}) == 3
    assert text_of(await gw.chat("mock:a")) == a
    assert text_of(await gw.chat("a")) == a  # the adapter's own id
    assert gw.deployment.stats()["adapters"]["loads"] == 2


async def test_models_list_adapters_with_their_parent(gw: Gateway) -> None:
    cards = {m["id"]: m for m in (await gw.client.get("/v1/models")).json()["data"]}
    assert cards["mock:a"]["parent"] == "mock" and cards["mock:a"]["root"] == "mock"
    assert "parent" not in cards["mock"]
    native = {m["id"]: m for m in (await gw.client.get("/models")).json()["models"]}
    assert native["mock:b"]["parent"] == "mock"
    assert (await gw.client.get("/v1/models/mock:b")).json()["parent"] == "mock"


async def test_usage_is_metered_per_adapter_with_its_load_time(gw: Gateway) -> None:
    await gw.chat("mock:a")
    await gw.chat("mock:a")
    await gw.chat("mock")
    assert [e.model for e in gw.events] == ["mock:a", "mock:a", "mock"]
    loads = [e.adapter_load_ms for e in gw.events]
    assert loads[0] is not None and loads[1:] == [None, None]
    assert all(e.completion_tokens > 0 for e in gw.events)


async def test_an_unknown_adapter_is_a_404_listing_the_known_ones(gw: Gateway) -> None:
    response = await gw.chat("mock:zzz")
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["code"] == "adapter_not_found" and error["param"] == "model"
    assert "a, b" in error["message"]


async def test_register_use_and_drop_an_adapter_at_run_time(gw: Gateway, tmp_path: Path) -> None:
    path = make_adapter(tmp_path / "new")
    created = await gw.client.post("/models/mock/adapters", headers=ADMIN,
                                   json={"id": "fresh", "path": path})
    assert created.status_code == 201, created.text
    assert created.json()["id"] == "mock:fresh"
    assert text_of(await gw.chat("mock:fresh")) != text_of(await gw.chat("mock"))
    dropped = await gw.client.delete("/models/mock/adapters/fresh", headers=ADMIN)
    assert dropped.json() == {"id": "mock:fresh", "deleted": True}
    assert (await gw.chat("mock:fresh")).status_code == 404


@pytest.mark.parametrize("body, status, code, says", [
    ({"id": "x", "path": "other"}, 400, "ADAPTER_INVALID", "trained on 'other-model'"),
    ({"id": "x", "path": "missing"}, 400, "ADAPTER_INVALID", "not an adapter folder"),
    ({"id": "x", "path": "rank"}, 400, "ADAPTER_INVALID", "rank 128"),
    ({"id": "a:b", "path": "ok"}, 400, "INVALID_REQUEST", "id"),
    ({"id": "plain", "path": "ok"}, 400, "INVALID_REQUEST", "is a model id"),
])
async def test_bad_registrations_are_4xx_saying_why(
    gw: Gateway, tmp_path: Path, body: dict, status: int, code: str, says: str
) -> None:
    folders = {"other": make_adapter(tmp_path / "o", base="other-model"),
               "missing": str(tmp_path / "none"), "rank": make_adapter(tmp_path / "r", rank=128),
               "ok": make_adapter(tmp_path / "ok")}
    response = await gw.client.post("/models/mock/adapters", headers=ADMIN,
                                    json={**body, "path": folders[body["path"]]})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and says in error["message"]


async def test_registration_needs_the_admin_key_and_a_base_with_adapters(
    gw: Gateway, tmp_path: Path
) -> None:
    path = make_adapter(tmp_path / "k")
    no_key = await gw.client.post("/models/mock/adapters", json={"id": "k", "path": path})
    assert no_key.status_code == 401
    plain = await gw.client.post("/models/plain/adapters", headers=ADMIN, json={"id": "k", "path": path})
    assert plain.status_code == 400 and "serves no adapters" in plain.json()["error"]["message"]
    unknown = await gw.client.delete("/models/mock/adapters/nope", headers=ADMIN)
    assert unknown.status_code == 404 and "a, b" in unknown.json()["error"]["message"]


async def test_a_registration_survives_a_restart_and_reaches_other_gateways(tmp_path: Path) -> None:
    from serve_app.gateway.adapters import AdapterCatalog
    from serve_app.store.sqlite import SQLiteStore

    settings = load_settings({"models": [{"id": "mock", "engine": {"type": "mock"},
                                          "adapters": {"max_loaded": 2}}]})
    models = {m.id: m for m in settings.models}
    store = SQLiteStore(tmp_path / "state.db")
    await store.open()
    try:
        first, second = AdapterCatalog(models, store), AdapterCatalog(models, store)
        await first.register("mock", "late", make_adapter(tmp_path / "late"))
        assert second.split("late") is None  # not yet read
        assert await second.refresh()
        ref = second.split("mock:late")
        assert ref is not None and ref.path == str(tmp_path / "late")
        restarted = AdapterCatalog(models, store)
        await restarted.refresh()
        assert [r.model_id for r in restarted.cards()] == ["mock:late"]
    finally:
        await store.close()


async def test_a_registration_or_a_drop_reaches_a_following_gateway_at_once(tmp_path: Path) -> None:
    """The other replica follows the shared model-state long poll: no health check needed."""
    import asyncio
    import time

    from serve_app.gateway.adapters import AdapterCatalog
    from serve_app.gateway.model_state import MemoryModelState
    from serve_app.store.sqlite import SQLiteStore

    settings = load_settings({"models": [{"id": "mock", "engine": {"type": "mock"},
                                          "adapters": {"max_loaded": 2}}]})
    models = {m.id: m for m in settings.models}
    store, shared = SQLiteStore(tmp_path / "state.db"), MemoryModelState()
    await store.open()
    first, second = AdapterCatalog(models, store), AdapterCatalog(models, store)
    first.changes = second.changes = lambda: shared
    following = asyncio.create_task(second.follow())

    async def seen_by_second(present: bool) -> None:
        deadline = time.monotonic() + 5
        while ("late" in second.by_base["mock"]) != present:
            assert time.monotonic() < deadline, "the other replica never re-read the store"
            await asyncio.sleep(0.01)

    try:
        await seen_by_second(False)
        second._refreshed = time.monotonic() + 3600  # its own throttled refresh would not read
        await first.register("mock", "late", make_adapter(tmp_path / "late"))
        await seen_by_second(True)
        await first.drop("mock", "late")
        await seen_by_second(False)
    finally:
        following.cancel()
        await store.close()


def test_adapters_built_on_the_bundled_models_cache_folder_fit_it(tmp_path: Path) -> None:
    from deployments.adapter_files import base_names

    model = load_settings({"models": [{"id": "smollm2", "engine": {"type": "transformers"},
                                       "adapters": {}}]}).models[0]
    for base in ("HuggingFaceTB/SmolLM2-135M-Instruct",
                 "/root/.cache/troupe/models/SmolLM2-135M-Instruct.Q4_1"):
        path = make_adapter(tmp_path / base.replace("/", "_"), base=base)
        assert inspect_adapter(path, 8, base_names(model)).base_model == base


async def test_unary_answers_name_the_replica_that_served_them(gw: Gateway) -> None:
    response = await gw.client.post("/v1/chat/completions", json={
        "model": "mock:a", "n": 2, "max_tokens": 4,
        "messages": [{"role": "user", "content": "Say something."}]})
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2
    assert response.headers["x-troupe-replica"] == gw.deployment.replica_id
    completion = await gw.client.post("/v1/completions", json={
        "model": "mock:b", "prompt": "Say", "max_tokens": 4})
    assert completion.headers["x-troupe-replica"] == gw.deployment.replica_id


def test_transformers_models_with_adapters_keep_weights_that_take_them() -> None:
    def model(**engine: Any) -> dict[str, Any]:
        return {"id": "m", "engine": {"type": "transformers", **engine}, "adapters": {}}

    assert load_settings({"models": [model()]}).models[0].engine.weights == "bfloat16"
    assert load_settings({"models": [model(weights="float32")]}).models[0].engine.weights == "float32"
    for quantized in ("int8", "auto"):
        with pytest.raises(ConfigError, match="weights"):
            load_settings({"models": [model(weights=quantized)]})

"""The store contract for LoRA adapters (issue 19), against SQLite and PostgreSQL: adapters
registered at run time, and the ledger's ``adapter_load_ms``. Fixtures and helpers come
from ``test_store_contract``."""

from __future__ import annotations

from tests.integration import test_store_contract as contract
from tests.integration.test_store_contract import StoreFactory, entry

# The contract's fixtures: a store per backend, on the module's private PostgreSQL server.
make_store = contract.make_store
postgres_server = contract.postgres_server


async def test_adapters_put_replace_list_delete_and_survive_reopen(
    make_store: StoreFactory,
) -> None:
    from serve_app.store.adapter_tables import AdapterRow

    first = make_store()
    await first.open()
    assert await first.adapter_list() == []
    await first.adapter_put(AdapterRow("smollm2", "support", "/a/support", 10.0))
    await first.adapter_put(AdapterRow("mock", "support", "/b/support", 11.0))
    await first.adapter_put(AdapterRow("smollm2", "support", "/a/support-v2", 12.5))
    await first.close()
    second = make_store()
    await second.open()
    assert await second.adapter_list() == [
        AdapterRow("mock", "support", "/b/support", 11.0),
        AdapterRow("smollm2", "support", "/a/support-v2", 12.5),
    ]
    assert await second.adapter_delete("smollm2", "support") is True
    assert await second.adapter_delete("smollm2", "support") is False
    assert [(r.base, r.adapter_id) for r in await second.adapter_list()] == [("mock", "support")]


async def test_adapter_load_ms_round_trips_in_the_ledger(make_store: StoreFactory) -> None:
    store = make_store()
    await store.open()
    await store.ledger_append([entry(event_id="lora-1", model="base:one", adapter_load_ms=12.5),
                               entry(event_id="lora-2", model="base:one")])
    rows = {e.event.event_id: e.event for e in await store.ledger_window(0, 10_000)}
    assert (rows["lora-1"].adapter_load_ms, rows["lora-2"].adapter_load_ms) == (12.5, None)
    assert rows["lora-1"].model == "base:one"

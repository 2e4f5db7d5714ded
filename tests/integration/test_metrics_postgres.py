"""The metrics actor on PostgreSQL (the cluster store): exact totals and a lossless restart."""

from __future__ import annotations

import pytest

from actors.metrics import MetricsActor
from serve_app.store.postgres import PostgresStore
from tests.store_server import postgres_server_fixture
from tests.unit.test_metrics_actor import COSTS, PRICES, known_mix, samples, total

postgres_server = postgres_server_fixture(scope="module")


async def test_metrics_actor_on_postgres_restarts_with_identical_totals(postgres_server) -> None:
    actor = MetricsActor(postgres_server.dsn, PRICES, store=PostgresStore(postgres_server.dsn))
    await actor.start()
    assert await actor.record(known_mix()) == 5
    before = samples(await actor.prometheus())
    assert total(before, "troupe_cost_usd_total") == pytest.approx(sum(COSTS.values()), abs=1e-9)
    assert total(before, "troupe_cost_estimated_requests_total") == 1
    await actor.close()

    restarted = MetricsActor(postgres_server.dsn, PRICES, store=PostgresStore(postgres_server.dsn))
    await restarted.start()
    after = samples(await restarted.prometheus())
    assert after == before  # counters and histograms rebuilt from the PostgreSQL ledger
    assert await restarted.record(known_mix()) == 0  # a retried batch is not counted again
    usage = await restarted.usage(0, 10_000, "provider")
    assert usage["totals"]["requests"] == 5 and usage["totals"]["estimated_entries"] == 1
    await restarted.close()

"""Cold starts: the bounded wait for a replica, the cold-start flag and its TTFT histogram.

The real thing (a deployment scaled to zero on a multi-node cluster) is in
tests/cluster; these pin the pieces without Ray.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from actors.metrics import MetricsActor
from deployments.llm import LLMDeployment
from serve_app.settings import ModelConfig
from serve_app.gateway.dispatch import wait_for_replica as _wait_for_replica
from serve_app.errors import Overloaded, native_error_body
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams
from tests.unit.test_metrics_actor import FakeStore, ev, samples, total


def _model(autoscaling: Any = None, **engine: Any) -> ModelConfig:
    deployment = {"autoscaling": autoscaling} if autoscaling else {}
    return ModelConfig.model_validate({
        "id": "m", "engine": {"type": "mock", "token_delay_ms": 0, **engine},
        "deployment": deployment,
    })


class PendingResponse:
    """A handle response whose replica assignment resolves when ``assign`` is set."""

    def __init__(self) -> None:
        self.assign = asyncio.Event()
        self.cancelled = False

    async def _fetch_future_result_async(self) -> None:
        await self.assign.wait()

    def cancel(self) -> None:
        self.cancelled = True


async def test_no_replica_within_the_cold_start_timeout_is_a_503_with_retry_after():
    model = _model({"min_replicas": 0, "max_replicas": 2, "cold_start_timeout_s": 0.2})
    response = PendingResponse()
    started = time.monotonic()
    with pytest.raises(Overloaded) as info:
        await _wait_for_replica(response, model)
    waited = time.monotonic() - started

    assert 0.2 <= waited < 2.0
    assert response.cancelled  # the queued request is withdrawn, not left behind
    err = info.value
    assert err.status == 503 and err.code == "OVERLOADED"
    assert err.headers() == {"Retry-After": "1"}
    assert err.details["reason"] == "cold_start"
    body = native_error_body(err)["error"]
    assert "scaled to zero" in body["message"] and "cold_start_timeout_s" in body["message"]


async def test_a_replica_assigned_in_time_lets_the_request_through():
    model = _model({"min_replicas": 0, "max_replicas": 2, "cold_start_timeout_s": 5})
    response = PendingResponse()
    asyncio.get_running_loop().call_later(0.05, response.assign.set)
    await _wait_for_replica(response, model)
    assert not response.cancelled


async def test_busy_replicas_of_a_model_that_never_scales_to_zero_say_so():
    model = _model({"min_replicas": 1, "max_replicas": 2, "cold_start_timeout_s": 0.05})
    with pytest.raises(Overloaded) as info:
        await _wait_for_replica(PendingResponse(), model)
    assert info.value.details["reason"] == "no_free_replica"
    assert "scaled to zero" not in info.value.message


async def test_fixed_size_deployments_are_not_bounded():
    response = PendingResponse()  # never assigned: returning at all proves no wait
    await asyncio.wait_for(_wait_for_replica(response, _model()), timeout=1)
    assert not response.cancelled


async def test_a_fixed_size_model_with_a_queue_bound_waits_at_most_that_for_a_replica():
    """Serve's queue (every replica at max_ongoing_requests) is bounded like the engine's."""
    model = ModelConfig.model_validate({
        "id": "m", "engine": {"type": "transformers", "max_queue_wait_s": 0.2}})
    response = PendingResponse()
    started = time.monotonic()
    with pytest.raises(Overloaded) as info:
        await _wait_for_replica(response, model)
    assert 0.2 <= time.monotonic() - started < 2.0
    assert response.cancelled
    err = info.value
    assert err.status == 503 and err.details["reason"] == "no_free_replica"
    assert "max_queue_wait_s" in err.message and err.headers() == {"Retry-After": "1"}


def test_cold_start_timeout_is_not_passed_to_serve():
    model = _model({"min_replicas": 0, "max_replicas": 2, "cold_start_timeout_s": 30,
                    "look_back_period_s": 2})
    config = model.deployment.to_serve()["autoscaling_config"]
    assert "cold_start_timeout_s" not in config
    assert config["look_back_period_s"] == 2


def _request(dispatched_at: float) -> GenerationRequest:
    req = GenerationRequest("r1", SamplingParams(max_tokens=3), [ChatMessage("user", "hi")])
    req.dispatched_at = dispatched_at
    return req


async def test_a_request_sent_before_its_replica_was_ready_is_flagged_cold():
    sent = time.time()
    deployment = LLMDeployment(_model())
    await deployment.start()  # the replica comes up after the request was sent

    cold = [c async for c in deployment.stream(_request(sent))]
    warm = [c async for c in deployment.stream(_request(time.time()))]
    assert cold[0].cold_start and not any(c.cold_start for c in cold[1:])
    assert not any(c.cold_start for c in warm)
    assert (await deployment.complete(_request(sent))).cold_start


async def test_cold_start_ttft_has_its_own_histogram():
    actor = MetricsActor("memory://", {}, store=FakeStore())
    await actor.record([
        ev("warm", ttft_ms=40.0),
        ev("cold", ttft_ms=4200.0, cold_start=True),
    ])
    metrics = samples(await actor.prometheus())
    assert total(metrics, "troupe_ttft_seconds_count") == 2
    assert total(metrics, "troupe_cold_start_ttft_seconds_count") == 1
    assert total(metrics, "troupe_cold_start_ttft_seconds_sum") == pytest.approx(4.2)
    assert total(metrics, "troupe_cold_start_ttft_seconds_bucket", le="2.5") == 0
    assert total(metrics, "troupe_cold_start_ttft_seconds_bucket", le="5.0") == 1


# --------------------------------------------------------------------------- gateway calls


class PendingHandle:
    """A model handle whose every call stays queued (no replica ever takes it)."""

    def __init__(self) -> None:
        self.responses: list[PendingResponse] = []

    def options(self, **_: Any) -> "PendingHandle":
        return self

    def __getattr__(self, method: str) -> Any:
        def remote(*_: Any) -> PendingResponse:
            self.responses.append(PendingResponse())
            return self.responses[-1]

        return type("Method", (), {"remote": staticmethod(remote)})


def _core(models: list[dict[str, Any]], handle: PendingHandle):
    from serve_app.settings import load_settings
    from serve_app.gateway.core import GatewayCore

    settings = load_settings({"models": models})
    return GatewayCore(settings, {m.id: handle for m in settings.models})


FAST_COLD = {"min_replicas": 0, "max_replicas": 1, "cold_start_timeout_s": 0.1}


async def test_text_and_embedding_calls_give_up_after_the_cold_start_timeout():
    from serve_app.gateway.metering import RequestInfo
    from serve_app.protocol.modalities import EmbeddingRequest

    handle = PendingHandle()
    core = _core([
        {"id": "chat", "engine": {"type": "mock"}, "deployment": {"autoscaling": FAST_COLD}},
        {"id": "emb", "modality": "embeddings", "engine": {"type": "mock"},
         "deployment": {"autoscaling": FAST_COLD}},
    ], handle)

    with pytest.raises(Overloaded):
        await core.complete("chat", _request(time.time()), RequestInfo("/v1/completions"))
    with pytest.raises(Overloaded):
        await anext(core.stream("chat", _request(time.time()), RequestInfo("/inference/stream")))
    with pytest.raises(Overloaded):
        await core.embed("emb", EmbeddingRequest("e1", ["hi"]), RequestInfo("/v1/embeddings"))
    assert len(handle.responses) == 3 and all(r.cancelled for r in handle.responses)
    assert core.in_flight == 0


# --------------------------------------------------------------------------- the ledger


async def test_the_cold_start_flag_is_a_ledger_column_added_to_old_files(tmp_path):
    """A v1 ledger file (before cold starts were recorded) is migrated in place: its rows
    read back as warm, new rows keep the flag, and a rebuilt actor counts cold starts."""
    import sqlite3

    from serve_app.store.sqlite import _MIGRATIONS, SQLiteStore

    path = tmp_path / "troupe.db"
    with sqlite3.connect(path) as conn:  # what the first schema version created
        for statement in _MIGRATIONS["ledger"][0]:
            conn.execute(statement)
        conn.execute("CREATE TABLE schema_version (component TEXT NOT NULL PRIMARY KEY,"
                     " version INTEGER NOT NULL) STRICT")
        conn.execute("INSERT INTO schema_version VALUES ('ledger', 1)")
        conn.execute(
            "INSERT INTO ledger VALUES ('old', 1000.0, 'm', '/r', 'local', 'anonymous', "
            "'default', 200, NULL, 'stop', 0, 1, 1, 0, NULL, 5.0, 9.0, '[]', NULL, 0.0, 0, 'x')"
        )
    store = SQLiteStore(path)
    actor = MetricsActor("sqlite:///" + str(path).lstrip("/"), {}, store=store)
    await actor.record([ev("new", ttft_ms=3000.0, cold_start=True, ts=1001.0)])
    [old, new] = await store.ledger_window(0, 2000)
    assert (old.event.event_id, old.event.cold_start) == ("old", False)
    assert (new.event.event_id, new.event.cold_start) == ("new", True)
    await store.close()

    rebuilt = MetricsActor("sqlite:///" + str(path).lstrip("/"), {}, store=SQLiteStore(path))
    await rebuilt.start()
    metrics = samples(await rebuilt.prometheus())
    assert total(metrics, "troupe_cold_start_ttft_seconds_count") == 1
    assert total(metrics, "troupe_ttft_seconds_count") == 2
    await rebuilt.close()


class _Unassigned:
    """A streamed handle call Serve refused to assign (its queue full): awaiting the
    assignment raises, and so does Serve's ``cancel`` (it re-raises the failure)."""

    def __init__(self, failure: BaseException) -> None:
        self.failure = failure

    async def _fetch_future_result_async(self) -> None:
        raise self.failure

    def cancel(self) -> None:
        raise self.failure


class _Method:
    def __init__(self, failure: BaseException) -> None:
        self.failure = failure

    def remote(self, request: Any) -> _Unassigned:
        return _Unassigned(self.failure)


class _RefusingHandle:
    def __init__(self, failure: BaseException) -> None:
        self.stream = _Method(failure)

    def options(self, **_: Any) -> "_RefusingHandle":
        return self


async def test_a_stream_refused_by_serves_full_queue_is_a_429_not_a_500():
    from ray.serve.exceptions import BackPressureError

    from serve_app.gateway.dispatch import Dispatcher
    from serve_app.gateway.metering import RequestInfo
    from serve_app.settings import TroupeSettings

    settings = TroupeSettings.model_validate({"models": [
        {"id": "m", "engine": {"type": "transformers", "max_queue_wait_s": 5}}]})
    dispatcher = Dispatcher(settings, {"m": _RefusingHandle(
        BackPressureError(num_queued_requests=100, max_queued_requests=100))})
    chunks = dispatcher.stream("m", "stream", _request(0.0), RequestInfo("/v1/chat/completions"),
                               lambda meter, chunk: True)
    with pytest.raises(Overloaded) as info:
        await chunks.__anext__()
    assert info.value.status == 429 and info.value.headers()["Retry-After"] == "1"
    assert dispatcher.in_flight == 0

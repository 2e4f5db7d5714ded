"""The gateway's health, cancellation, timeouts and handle failures over in-process HTTP
with fake model handles (see gateway_fakes)."""

from __future__ import annotations

import asyncio
from typing import Any
import pytest

from tests.unit.gateway_fakes import (
    GatewayUnderTest,
    MODELS,
    assert_openai_error,
    chat_body,
    eventually,
    make_gateway,
    sse_json,
)


# --------------------------------------------------------------- health, cancel


async def test_health_reports_models_idle(gw: GatewayUnderTest) -> None:
    response = await gw.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["models_loaded"] == len(MODELS)
    by_id = {m["id"]: m for m in body["models"]}
    assert set(by_id) == {m["id"] for m in MODELS}
    assert all(m["active_requests"] == 0 and m["loaded"] for m in by_id.values())


async def test_health_shows_engine_side_active_requests_and_cancel_frees_them(gw: GatewayUnderTest) -> None:
    slow = {"model": "mock-slow", "messages": [{"role": "user", "content": "go"}], "max_tokens": 1500}
    inflight = asyncio.ensure_future(gw.client.post("/v1/chat/completions", json=slow))
    try:
        await eventually(lambda: gw.active("mock-slow") == 1)

        health = (await gw.get("/health")).json()
        by_id = {m["id"]: m for m in health["models"]}
        assert by_id["mock-slow"]["active_requests"] == 1
        assert by_id["mock-fast"]["active_requests"] == 0
        assert health["in_flight_requests"] == 1
    finally:
        inflight.cancel()  # the client goes away mid-request
    with pytest.raises(asyncio.CancelledError):
        await inflight

    # The gateway cancelled the remote call, and the engine freed the slot.
    await eventually(lambda: gw.active("mock-slow") == 0)
    assert any(getattr(r, "cancelled", False) for r in gw.replicas["mock-slow"].responses)
    assert gw.core.in_flight == 0


async def test_native_models_lists_loaded_state_and_resources(gw: GatewayUnderTest) -> None:
    response = await gw.get("/models")
    assert response.status_code == 200
    data = {m["id"]: m for m in response.json()["models"]}
    fast = data["mock-fast"]
    assert fast["loaded"] is True
    assert fast["engine"] == "mock"
    assert "streaming" in fast["capabilities"]
    assert fast["context_length"] == 4096
    assert fast["default_max_tokens"] == 64
    assert fast["resources"]["max_ongoing_requests"] == 30


async def test_in_flight_returns_to_zero_after_streams(gw: GatewayUnderTest) -> None:
    await gw.post("/v1/chat/completions", json=chat_body(max_tokens=5, stream=True))
    await gw.post("/inference/stream", json={"model": "mock-fast", "prompt": "x", "max_tokens": 5})
    await gw.post("/v1/chat/completions", json={**chat_body(stream=True), "model": "mock-broken"})
    assert gw.core.in_flight == 0
    await eventually(lambda: all(gw.active(m["id"]) == 0 for m in MODELS))


async def test_model_ids_with_a_slash_are_routable(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/models/org/mock")
    assert response.status_code == 200
    assert response.json()["id"] == "org/mock"
    chat = await gw.post("/v1/chat/completions", json={**chat_body(max_tokens=3), "model": "org/mock"})
    assert chat.status_code == 200


async def test_client_disconnect_mid_stream_aborts_the_engine(gw: GatewayUnderTest) -> None:
    body = {**chat_body(max_tokens=1500, stream=True), "model": "mock-slow"}
    inflight = asyncio.ensure_future(gw.client.post("/v1/chat/completions", json=body))
    await eventually(lambda: gw.active("mock-slow") == 1)

    inflight.cancel()  # the client goes away while tokens are streaming
    with pytest.raises(asyncio.CancelledError):
        await inflight

    await eventually(lambda: gw.active("mock-slow") == 0)
    assert any(getattr(r, "cancelled", False) for r in gw.replicas["mock-slow"].responses)
    assert gw.core.in_flight == 0


async def test_health_is_degraded_when_a_replica_does_not_answer(gw: GatewayUnderTest) -> None:
    gw.replicas["mock-fast"].stats_failure = RuntimeError("replica died")
    gw.replicas["mock-slow"].stats_failure = "hang"

    response = await gw.get("/health")

    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "degraded"
    by_id = {m["id"]: m for m in body["models"]}
    assert by_id["mock-fast"]["loaded"] is False
    assert by_id["mock-fast"]["reason"] == "RuntimeError"
    assert by_id["mock-slow"]["status"] == "unavailable"
    assert "no answer" in by_id["mock-slow"]["reason"]
    assert by_id["mock-broken"]["loaded"] is True
    assert body["models_loaded"] == len(MODELS) - 2


async def test_total_timeout_is_504_and_stops_the_engine() -> None:
    gateway = make_gateway(request_timeout_s=0.1)
    try:
        response = await gateway.post(
            "/v1/chat/completions", json={**chat_body(max_tokens=1500), "model": "mock-slow"}
        )
        err = assert_openai_error(response, 504, "timeout")
        assert err["type"] == "timeout_error"
        await eventually(lambda: gateway.active("mock-slow") == 0)
    finally:
        await gateway.client.aclose()


async def test_idle_stream_timeout_mid_stream_is_a_final_error_event() -> None:
    gateway = make_gateway(stream_idle_timeout_s=0.05)
    # The link to mock-merge stalls for longer than the idle timeout after the first chunk.
    gateway.replicas["mock-merge"].reader_delay_s = 0.3
    try:
        response = await gateway.post(
            "/v1/chat/completions",
            json={**chat_body(max_tokens=50, stream=True), "model": "mock-merge"},
        )
        assert response.status_code == 200
        events, raw = sse_json(response)
        assert raw[-1] == "[DONE]"
        assert events[-1]["error"]["code"] == "timeout"
        await eventually(lambda: gateway.active("mock-merge") == 0)
    finally:
        await gateway.client.aclose()


def _ray_failures() -> list[Any]:
    from ray import exceptions as ray_exc
    from ray.serve import exceptions as serve_exc

    return [
        pytest.param(
            serve_exc.BackPressureError(num_queued_requests=9, max_queued_requests=8),
            429, "overloaded", "1", id="queue-full",
        ),
        pytest.param(
            serve_exc.DeploymentUnavailableError("LLM_mock-fast"),
            503, "overloaded", "5", id="no-replica",
        ),
        pytest.param(
            ray_exc.ActorUnavailableError("replica died", None),
            500, "inference_failed", None, id="replica-died",
        ),
        pytest.param(
            ValueError("internal detail: /srv/secret"),
            500, "internal_error", None, id="unexpected",
        ),
    ]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(("failure", "status", "code", "retry_after"), _ray_failures())
async def test_handle_failures_map_to_named_errors(
    gw: GatewayUnderTest, failure: BaseException, status: int, code: str, retry_after, stream: bool
) -> None:
    gw.replicas["mock-fast"].call_failure = failure
    response = await gw.post("/v1/chat/completions", json=chat_body(stream=stream))

    assert_openai_error(response, status, code)
    assert response.headers.get("retry-after") == retry_after
    assert "/srv/secret" not in response.text
    assert gw.core.in_flight == 0

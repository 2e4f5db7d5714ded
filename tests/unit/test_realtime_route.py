"""The /v1/realtime route in-process: auth by header or by OpenAI's subprotocol token,
the chosen subprotocol, and a text-only turn over the gateway core (real policy layer,
SQLite store, mock text engine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from actors.quota import QuotaActor
from deployments.llm import LLMDeployment
from serve_app.build.app import build_fastapi_app
from serve_app.gateway.core import GatewayCore
from serve_app.policies.keys import mint_key
from serve_app.policies.layer import PolicyLayer
from serve_app.protocol.metrics import RequestEvent
from serve_app.settings import load_settings
from serve_app.store.sqlite import SQLiteStore
from tests.unit.gateway_fakes import MODELS, FakeHandle, FakeReplica

EVENTS: list[RequestEvent] = []


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[TestClient, str]]:
    settings = load_settings({"models": MODELS, "limits": {"default": {"requests_per_minute": 100}}})
    handles = {m.id: FakeHandle(FakeReplica(LLMDeployment(m))) for m in settings.models}
    core = GatewayCore(settings, handles)
    EVENTS.clear()
    core.record = EVENTS.append  # what the metrics recorder would be sent
    store = SQLiteStore(tmp_path / "state.db")
    layer = PolicyLayer(settings, store, QuotaActor(), bind_host="127.0.0.1")

    async def new_key() -> str:
        await store.open()
        token, row = mint_key("test", "workspace")
        await store.key_create(row)
        await layer.keys.refresh()
        return token

    with TestClient(build_fastapi_app(core, policies=layer)) as client:
        yield client, client.portal.call(new_key)  # type: ignore[union-attr]


def read_until(ws: Any, kind: str, limit: int = 500) -> list[dict[str, Any]]:
    events = []
    for _ in range(limit):
        events.append(ws.receive_json())
        if events[-1]["type"] == kind:
            return events
    raise AssertionError(f"no {kind} in {limit} events")


def text_turn(ws: Any) -> list[dict[str, Any]]:
    ws.send_json({"type": "session.update", "session": {"output_modalities": ["text"]}})
    ws.send_json({"type": "conversation.item.create", "item": {
        "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}})
    ws.send_json({"type": "response.create"})
    return read_until(ws, "response.done")


def test_subprotocol_key_authenticates_and_realtime_is_chosen(app: tuple[TestClient, str]) -> None:
    client, key = app
    protocols = ["realtime", f"openai-insecure-api-key.{key}"]
    with client.websocket_connect("/v1/realtime?model=mock-fast", subprotocols=protocols) as ws:
        assert ws.accepted_subprotocol == "realtime"
        assert ws.receive_json()["type"] == "session.created"
        events = text_turn(ws)
    kinds = [e["type"] for e in events]
    assert "rate_limits.updated" in kinds
    limits = next(e for e in events if e["type"] == "rate_limits.updated")["rate_limits"]
    assert limits[0]["name"] == "requests" and limits[0]["limit"] == 100
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["usage"]["output_tokens"] > 0
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text and text == done["output"][0]["content"][0]["text"]


def test_bearer_header_authenticates(app: tuple[TestClient, str]) -> None:
    client, key = app
    with client.websocket_connect("/v1/realtime?model=mock-fast",
                                  headers={"Authorization": f"Bearer {key}"}) as ws:
        assert ws.receive_json()["type"] == "session.created"
        assert text_turn(ws)[-1]["response"]["status"] == "completed"


@pytest.mark.parametrize("protocols", [["realtime"], ["realtime", "openai-insecure-api-key.trp_wrong"]])
def test_missing_or_wrong_key_is_an_error_then_4401(app: tuple[TestClient, str],
                                                     protocols: list[str]) -> None:
    client, _ = app
    with client.websocket_connect("/v1/realtime?model=mock-fast", subprotocols=protocols) as ws:
        err = ws.receive_json()
        assert err["type"] == "error" and err["error"]["code"] == "authentication_failed"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == 4401


def test_audio_commit_without_a_transcription_model_is_an_error(app: tuple[TestClient, str]) -> None:
    client, key = app
    with client.websocket_connect("/v1/realtime?model=mock-fast",
                                  headers={"Authorization": f"Bearer {key}"}) as ws:
        assert ws.receive_json()["type"] == "session.created"
        ws.send_json({"type": "session.update", "session": {"output_modalities": ["text"],
                                                            "audio": {"input": {"turn_detection": None}}}})
        assert ws.receive_json()["type"] == "session.updated"
        ws.send_json({"type": "input_audio_buffer.append", "audio": "AAAA" * 2000})
        ws.send_json({"type": "input_audio_buffer.commit"})
        err = ws.receive_json()
        assert err["type"] == "error" and err["error"]["code"] == "no_transcription_model"
        assert text_turn(ws)[-1]["response"]["status"] == "completed"  # still usable


def test_function_call_round_trip_over_the_mock_engine_with_one_ledger_row_each(
        app: tuple[TestClient, str]) -> None:
    client, key = app
    weather = {"type": "function", "name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
    with client.websocket_connect("/v1/realtime?model=mock-fast",
                                  headers={"Authorization": f"Bearer {key}"}) as ws:
        read_until(ws, "session.created")
        ws.send_json({"type": "session.update", "session": {"output_modalities": ["text"],
                                                            "tools": [weather], "tool_choice": "required"}})
        read_until(ws, "session.updated")
        ws.send_json({"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Oslo?"}]}})
        ws.send_json({"type": "response.create"})
        events = read_until(ws, "response.done")
        call = events[-1]["response"]["output"][0]
        assert call["type"] == "function_call" and call["name"] == "get_weather"
        assert set(json.loads(call["arguments"])) == {"city"}  # constrained by the schema
        assert [e["type"] for e in events if "function_call_arguments" in e["type"]][-1] == \
            "response.function_call_arguments.done"
        ws.send_json({"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": call["call_id"], "output": "Sunny, 21 C"}})
        ws.send_json({"type": "response.create", "response": {"tool_choice": "auto"}})
        events = read_until(ws, "response.done")
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["output"][0]["type"] == "message"
    assert done["output"][0]["content"][0]["text"]
    rows = [e for e in EVENTS if e.route == "/v1/realtime"]
    assert [r.finish_reason for r in rows] == ["tool_calls", "stop"]  # one row per response
    assert all(r.audio_in_s == 0 and r.audio_out_s == 0 and r.ttfa_ms is None for r in rows)
    assert rows[1].completion_tokens == done["usage"]["output_tokens"]

"""A session whose model is in ``realtime.proxy`` is relayed to the provider's realtime
endpoint: a loopback fake (aiohttp, in its own thread) checks the session actor's key and
plays a scripted turn; the app runs in-process (no Ray)."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any, Iterator

import pytest
from aiohttp import web
from starlette.testclient import TestClient

from deployments.llm import LLMDeployment
from serve_app.build.app import build_fastapi_app
from serve_app.gateway.core import GatewayCore
from serve_app.settings import ConfigError, load_settings
from tests.unit.gateway_fakes import FakeHandle, FakeReplica

KEY = "sk-realtime-test"


class FakeRealtimeProvider:
    """OpenAI's realtime endpoint, as far as one scripted text turn goes."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.auth: list[str] = []
        self.port = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    async def realtime(self, request: web.Request) -> web.StreamResponse:
        self.auth.append(request.headers.get("Authorization", ""))
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response({"error": {"message": "bad key"}}, status=401)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        model = request.query.get("model")
        await ws.send_json({"type": "session.created", "event_id": "ev_1",
                            "session": {"type": "realtime", "model": model}})
        async for message in ws:
            event = json.loads(message.data)
            self.received.append(event)
            if event["type"] == "response.create":
                for out in ({"type": "response.created", "response": {"id": "resp_up"}},
                            {"type": "response.output_text.delta", "response_id": "resp_up",
                             "delta": "Bonjour"},
                            {"type": "response.done", "response": {"id": "resp_up", "status": "completed"}}):
                    await ws.send_json(out)
        return ws

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/v1/realtime", self.realtime)
        runner = web.AppRunner(app)
        self.loop.run_until_complete(runner.setup())
        site = web.TCPSite(runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]  # started above
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(runner.cleanup())

    def __enter__(self) -> "FakeRealtimeProvider":
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def settings_for(port: int) -> Any:
    return load_settings({"models": [
        {"id": "mock-fast", "engine": {"type": "mock", "token_delay_ms": 0}},
        {"id": "gpt-realtime", "engine": {"type": "openai", "model": "gpt-realtime-2025",
                                          "base_url": f"http://127.0.0.1:{port}/v1",
                                          "api_key_env": "TROUPE_TEST_REALTIME_KEY",
                                          "credential": "openai-realtime-test"}},
    ], "realtime": {"proxy": ["gpt-realtime"]}})


@pytest.fixture
def provider() -> Iterator[FakeRealtimeProvider]:
    with FakeRealtimeProvider() as fake:
        yield fake


def app_for(port: int) -> TestClient:
    settings = settings_for(port)
    handles = {m.id: FakeHandle(FakeReplica(LLMDeployment(m))) for m in settings.models
               if m.id == "mock-fast"}
    return TestClient(build_fastapi_app(GatewayCore(settings, handles)))


def test_proxied_session_relays_both_ways_with_the_credential(provider, monkeypatch) -> None:
    monkeypatch.setenv("TROUPE_TEST_REALTIME_KEY", KEY)
    with app_for(provider.port) as client, client.websocket_connect(
            "/v1/realtime?model=gpt-realtime") as ws:
        created = ws.receive_json()
        assert created == {"type": "session.created", "event_id": "ev_1",
                           "session": {"type": "realtime", "model": "gpt-realtime-2025"}}
        ws.send_json({"type": "session.update", "session": {"type": "realtime", "instructions": "Hi"}})
        ws.send_json({"type": "response.create"})
        events = [ws.receive_json() for _ in range(3)]
    assert [e["type"] for e in events] == ["response.created", "response.output_text.delta",
                                           "response.done"]
    assert events[1]["delta"] == "Bonjour"
    assert [e["type"] for e in provider.received] == ["session.update", "response.create"]
    assert provider.received[0]["session"]["instructions"] == "Hi"  # passed on unchanged
    assert provider.auth == [f"Bearer {KEY}"]


def test_a_refused_credential_is_an_error_event(provider, monkeypatch) -> None:
    monkeypatch.setenv("TROUPE_TEST_REALTIME_KEY", "sk-wrong")
    with app_for(provider.port) as client, client.websocket_connect(
            "/v1/realtime?model=gpt-realtime") as ws:
        error = ws.receive_json()
    assert error["type"] == "error" and error["error"]["code"] == "authentication_failed"
    assert "401" in error["error"]["message"]


def test_a_missing_credential_names_its_variable(provider, monkeypatch) -> None:
    monkeypatch.delenv("TROUPE_TEST_REALTIME_KEY", raising=False)
    with app_for(provider.port) as client, client.websocket_connect(
            "/v1/realtime?model=gpt-realtime") as ws:
        error = ws.receive_json()
    assert "TROUPE_TEST_REALTIME_KEY" in error["error"]["message"]
    assert provider.auth == []  # nothing was sent upstream


def test_only_remote_openai_models_can_be_proxied() -> None:
    with pytest.raises(ConfigError, match="realtime.proxy: 'mock-fast'"):
        load_settings({"models": [{"id": "mock-fast", "engine": {"type": "mock"}}],
                       "realtime": {"proxy": ["mock-fast"]}})

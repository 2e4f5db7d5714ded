"""WebSocket /ws: streaming, many requests per socket, cancel, bad messages."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.mock_app import engine_active

TERMINAL = {"complete", "error"}


def ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://") + "/ws"


async def recv(ws, timeout: float = 10) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def collect_until_terminal(ws, ids: set[str], timeout: float = 30) -> dict[str, list[dict]]:
    """Read until every id in ``ids`` got a terminal message; returns messages per id."""
    per_id: dict[str, list[dict]] = {i: [] for i in ids}
    pending = set(ids)
    deadline = time.monotonic() + timeout
    while pending:
        msg = await recv(ws, max(0.1, deadline - time.monotonic()))
        rid = msg.get("id")
        if rid in per_id:
            per_id[rid].append(msg)
            if msg["type"] in TERMINAL:
                pending.discard(rid)
    return per_id


async def engine_active_async(base_url: str, model: str) -> int:
    async with httpx.AsyncClient(base_url=base_url, timeout=10) as c:
        body = (await c.get("/health")).json()
    return next(m["active_requests"] for m in body["models"] if m["id"] == model)


async def wait_engine_idle(base_url: str, model: str, timeout: float) -> float:
    start = time.monotonic()
    while await engine_active_async(base_url, model) != 0:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{model} engine still busy after {timeout}s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


async def test_ping_auth_and_stream(base_url: str) -> None:
    async with connect(ws_url(base_url)) as ws:
        await ws.send(json.dumps({"type": "ping", "ts": 1}))
        assert await recv(ws) == {"type": "pong", "ts": 1}
        await ws.send(json.dumps({"type": "auth", "token": "anything"}))
        assert (await recv(ws))["type"] == "auth.ok"
        await ws.send(json.dumps({"type": "inference", "id": "a", "model": "mock-5ms",
                                  "messages": [{"role": "user", "content": "hi"}],
                                  "max_tokens": 8, "temperature": 0}))
        msgs = (await collect_until_terminal(ws, {"a"}))["a"]
    tokens = [m for m in msgs if m["type"] == "token"]
    done = msgs[-1]
    assert len(tokens) >= 2 and done["type"] == "complete"
    assert sum(1 for m in msgs if m["type"] in TERMINAL) == 1
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 8
    # priced by the gateway from the model's price table (0.5 / 1.5 USD per 1M tokens)
    expected = (done["usage"]["prompt_tokens"] * 0.5 + 8 * 1.5) / 1e6
    assert done["cost_usd"] == pytest.approx(expected)
    assert done["latency_ms"]["ttft"] is not None
    with httpx.Client(base_url=base_url) as h:
        unary = h.post("/inference", json={"model": "mock-5ms", "max_tokens": 8, "temperature": 0,
                                           "messages": [{"role": "user", "content": "hi"}]}).json()
    assert "".join(t["token"] for t in tokens) == unary["text"]


async def test_many_requests_in_flight_each_end_once(base_url: str) -> None:
    ids = {f"r{i}" for i in range(6)}
    async with connect(ws_url(base_url)) as ws:
        for rid in sorted(ids):
            await ws.send(json.dumps({"type": "inference", "id": rid, "model": "mock-5ms",
                                      "prompt": f"question {rid}", "max_tokens": 10}))
        per_id = await collect_until_terminal(ws, ids)
        # nothing else arrives for these ids after their terminal message
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv(ws))["type"] == "pong"
    for rid, msgs in per_id.items():
        assert [m["type"] for m in msgs if m["type"] in TERMINAL] == ["complete"], rid
        assert msgs[-1]["usage"]["completion_tokens"] == 10


async def test_cancel_ends_with_cancelled_and_stops_engine(base_url: str) -> None:
    async with connect(ws_url(base_url)) as ws:
        await ws.send(json.dumps({"type": "inference", "id": "long", "model": "mock-slow",
                                  "prompt": "talk"}))
        first = await recv(ws)
        assert first["type"] == "token"
        assert await engine_active_async(base_url, "mock-slow") == 1
        await ws.send(json.dumps({"type": "cancel", "id": "long"}))
        msgs = (await collect_until_terminal(ws, {"long"}, timeout=5))["long"]
        took = await wait_engine_idle(base_url, "mock-slow", timeout=5)
        # the socket is still usable afterwards
        await ws.send(json.dumps({"type": "ping"}))
        assert (await recv(ws))["type"] == "pong"
    done = msgs[-1]
    assert done["type"] == "complete" and done["finish_reason"] == "cancelled"
    assert 1 <= done["usage"]["completion_tokens"] < 400
    assert took < 1.0


async def test_closing_socket_aborts_all_engine_work(base_url: str) -> None:
    async with connect(ws_url(base_url)) as ws:
        for rid in ("x1", "x2", "x3"):
            await ws.send(json.dumps({"type": "inference", "id": rid, "model": "mock-slow", "prompt": rid}))
        seen: set[str] = set()
        while len(seen) < 3:
            msg = await recv(ws)
            if msg["type"] == "token":
                seen.add(msg["id"])
        assert await engine_active_async(base_url, "mock-slow") == 3
    took = await wait_engine_idle(base_url, "mock-slow", timeout=5)
    assert took < 1.0


@pytest.mark.parametrize("raw, needs_id", [
    ("not json at all", False),
    ('["a", "list"]', False),
    ('{"no": "type"}', False),
    ('{"type": "teleport", "id": "q"}', True),
    ('{"type": "inference", "id": "q"}', True),
    ('{"type": "inference", "id": "q", "model": "mock-5ms", "prompt": "x", "max_tokens": -4}', True),
    ('{"type": "inference", "id": "q", "model": "missing-model", "prompt": "x"}', True),
    ('{"type": "inference", "model": "mock-5ms", "prompt": "x"}', False),
    ('{"type": "cancel"}', False),
])
async def test_bad_messages_get_error_and_socket_stays_usable(base_url: str, raw: str, needs_id: bool) -> None:
    async with connect(ws_url(base_url)) as ws:
        await ws.send(raw)
        err = await recv(ws)
        assert err["type"] == "error" and err["error"]["code"] in {"INVALID_REQUEST", "MODEL_NOT_FOUND"}
        assert err["error"]["message"]
        if needs_id:
            assert err["id"] == "q"
        await ws.send(json.dumps({"type": "inference", "id": "ok", "model": "mock-5ms",
                                  "prompt": "still here?", "max_tokens": 3}))
        msgs = (await collect_until_terminal(ws, {"ok"}))["ok"]
        assert msgs[-1]["type"] == "complete"


async def test_duplicate_id_in_flight_is_rejected(base_url: str) -> None:
    async with connect(ws_url(base_url)) as ws:
        await ws.send(json.dumps({"type": "inference", "id": "d", "model": "mock-slow", "prompt": "x",
                                  "max_tokens": 20}))
        await ws.send(json.dumps({"type": "inference", "id": "d", "model": "mock-5ms", "prompt": "y"}))
        msgs = []
        while not msgs or msgs[-1]["type"] != "error":
            msgs.append(await recv(ws))
        assert "already in flight" in msgs[-1]["error"]["message"]
        await ws.send(json.dumps({"type": "cancel", "id": "d"}))
        rest = (await collect_until_terminal(ws, {"d"}, timeout=5))["d"]
        assert rest[-1]["type"] == "complete" and rest[-1]["finish_reason"] == "cancelled"


async def test_engine_error_mid_stream_is_an_error_message(base_url: str) -> None:
    async with connect(ws_url(base_url)) as ws:
        await ws.send(json.dumps({"type": "inference", "id": "f", "model": "mock-fail", "prompt": "x"}))
        msgs = (await collect_until_terminal(ws, {"f"}))["f"]
    assert msgs[-1]["type"] == "error" and msgs[-1]["error"]["code"] == "INFERENCE_FAILED"
    assert [m["type"] for m in msgs].count("error") == 1


def test_engine_idle_after_ws_tests(http: httpx.Client) -> None:
    assert engine_active(http, "mock-slow") == 0

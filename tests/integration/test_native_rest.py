"""Native REST routes and HTTP cancellation, against the real Serve app."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import wait_until
from tests.mock_app import engine_active


def sse_events(text: str) -> list[tuple[str, dict]]:
    out, event = [], "message"
    for line in text.splitlines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            out.append((event, json.loads(line[6:])))
            event = "message"
    return out


def test_health_lists_models_with_engine_counts(http: httpx.Client) -> None:
    r = http.get("/health")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "ok"
    assert body["version"] and body["uptime_s"] >= 0
    assert body["models_loaded"] == len(body["models"]) >= 4
    assert all(m["active_requests"] == 0 and m["loaded"] for m in body["models"])
    assert "in_flight_requests" in body


def test_native_models(http: httpx.Client) -> None:
    data = {m["id"]: m for m in http.get("/models").json()["models"]}
    m = data["mock-5ms"]
    assert m["loaded"] is True and "text-generation" in m["capabilities"]
    assert m["context_length"] == 4096
    assert m["resources"]["num_cpus"] == 0.1 and m["resources"]["max_ongoing_requests"] == 64


def test_inference_unary(http: httpx.Client) -> None:
    r = http.post("/inference", json={"model": "mock-5ms", "prompt": "hello", "max_tokens": 6})
    body = r.json()
    assert r.status_code == 200
    assert body["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 6
    assert body["request_id"] == r.headers["x-request-id"]
    chat = http.post("/inference", json={
        "model": "mock-5ms", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 3


def test_natural_stop_without_max_tokens(http: httpx.Client) -> None:
    # mock-small-ctx answers in 8..48 tokens and has room for more: the engine stops itself
    body = http.post("/inference", json={"model": "mock-small-ctx", "prompt": "hi"}).json()
    assert body["finish_reason"] == "stop"
    assert 8 <= body["usage"]["completion_tokens"] <= 30


def test_inference_stream_format(http: httpx.Client) -> None:
    r = http.post("/inference/stream", json={"model": "mock-5ms", "prompt": "hello", "max_tokens": 6, "temperature": 0})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    tokens = [e for kind, e in events if "token" in e]
    assert [t["index"] for t in tokens] == list(range(len(tokens)))
    done = events[-1][1]
    assert done["done"] is True and done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 6
    unary = http.post("/inference", json={"model": "mock-5ms", "prompt": "hello", "max_tokens": 6, "temperature": 0})
    assert "".join(t["token"] for t in tokens) == unary.json()["text"]


def test_inference_stream_error_mid_stream(http: httpx.Client) -> None:
    r = http.post("/inference/stream", json={"model": "mock-fail", "prompt": "x", "max_tokens": 10})
    assert r.status_code == 200
    events = sse_events(r.text)
    kind, last = events[-1]
    assert kind == "error" and last["error"]["code"] == "INFERENCE_FAILED"
    assert last["request_id"] == r.headers["x-request-id"]


@pytest.mark.parametrize(
    "body, code",
    [
        ({"model": "mock-5ms"}, "INVALID_REQUEST"),
        ({"model": "mock-5ms", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "INVALID_REQUEST"),
        ({"model": "mock-5ms", "prompt": 5}, "INVALID_REQUEST"),
        ({"model": "mock-5ms", "prompt": "x", "max_tokens": -1}, "INVALID_REQUEST"),
        ({"model": "nope", "prompt": "x"}, "MODEL_NOT_FOUND"),
        ({"model": "mock-small-ctx", "prompt": "x", "max_tokens": 500}, "CONTEXT_LENGTH_EXCEEDED"),
    ],
)
@pytest.mark.parametrize("route", ["/inference", "/inference/stream"])
def test_native_errors_use_native_envelope(http: httpx.Client, route: str, body: dict, code: str) -> None:
    r = http.post(route, json=body)
    assert r.status_code == (404 if code == "MODEL_NOT_FOUND" else 400), r.text
    err = r.json()
    assert err["error"]["code"] == code and err["error"]["message"]
    assert err["request_id"] == r.headers["x-request-id"] and err["timestamp"]


def test_not_json_and_wrong_method(http: httpx.Client) -> None:
    r = http.post("/inference", content=b"prompt=hello", headers={"content-type": "text/plain"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "INVALID_REQUEST"
    r = http.get("/inference")
    assert r.status_code == 405 and r.json()["error"]["code"] == "METHOD_NOT_ALLOWED"
    r = http.get("/no/such/route")
    assert r.status_code == 404 and r.json()["error"]["code"] == "NOT_FOUND"


def _stream_some_then_disconnect(base_url: str, path: str, body: dict, tokens: int) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        with client.stream("POST", path, json=body) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: ") and ("token" in line or "content" in line):
                    seen += 1
                    if seen >= tokens:
                        break
    # leaving both context managers closes the TCP connection mid-stream


@pytest.mark.parametrize("path, body", [
    ("/inference/stream", {"model": "mock-slow", "prompt": "go"}),
    ("/v1/chat/completions", {"model": "mock-slow", "stream": True,
                              "messages": [{"role": "user", "content": "go"}]}),
])
def test_client_disconnect_aborts_engine_within_1s(base_url: str, http: httpx.Client, path, body) -> None:
    import threading

    started = threading.Event()
    t = threading.Thread(target=lambda: (_stream_some_then_disconnect(base_url, path, body, 3), started.set()))
    t.start()
    # While streaming, the engine itself reports the request (so the check below can fail).
    wait_until(lambda: engine_active(http, "mock-slow") >= 1, timeout=10)
    t.join(timeout=30)
    assert started.is_set()
    closed_at = time.monotonic()
    wait_until(lambda: engine_active(http, "mock-slow") == 0, timeout=5)
    took = time.monotonic() - closed_at
    assert took < 1.0, f"engine still generating {took:.2f}s after the client left"

"""Metrics, usage, custom metrics and traces through the real Serve app (mock engines).

A known mix of requests (unary, streamed, native, one cancelled mid-stream, one engine
error, one rejected) must show up exactly in /v1/usage and as exact deltas in /metrics.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from tests.conftest import wait_until

MSG = [{"role": "user", "content": "count the actors"}]
PRICE_IN, PRICE_OUT = 0.5, 1.5  # mock-5ms's configured USD per 1M tokens
REMOTE_IN, REMOTE_OUT = 0.15, 0.60  # gpt-4o-mini's list price (serve_app/data/prices.yaml)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out: dict[tuple[str, tuple], float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(snapshot: dict, name: str, **match: str) -> float:
    return sum(
        v for (n, labels), v in snapshot.items()
        if n == name and all(dict(labels).get(k) == want for k, want in match.items())
    )


def ws_cancelled_request(base_url: str) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        async with connect(base_url.replace("http://", "ws://") + "/ws") as ws:
            await ws.send(json.dumps({"type": "inference", "id": "c", "model": "mock-slow", "prompt": "go"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "token":
                pass
            await ws.send(json.dumps({"type": "cancel", "id": "c"}))
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg["type"] in ("complete", "error"):
                    return msg
    return asyncio.run(run())


def cut_remote_stream(base_url: str) -> int:
    """Stream from the remote model and hang up after 2 deltas: returns deltas seen."""
    seen = 0
    with httpx.Client(base_url=base_url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json={
                "model": "remote-gpt", "messages": MSG, "stream": True}) as r:
            for line in r.iter_lines():
                if '"content":"' in line and '"role"' not in line:
                    seen += 1
                    if seen == 2:
                        break
    return seen


def test_known_mix_is_counted_exactly(http: httpx.Client, base_url: str, fake_openai) -> None:
    before = samples(http.get("/metrics").text)
    t0 = time.time()
    unary = http.post("/v1/chat/completions", json={"model": "mock-5ms", "messages": MSG, "max_tokens": 5}).json()
    streamed = http.post("/v1/chat/completions", json={
        "model": "mock-5ms", "messages": MSG, "max_tokens": 7, "stream": True,
        "stream_options": {"include_usage": True}}).text
    stream_usage = json.loads([l for l in streamed.splitlines() if '"usage":{' in l][-1][6:])["usage"]
    native = http.post("/inference", json={"model": "mock-5ms", "prompt": "hello there", "max_tokens": 3}).json()
    cancelled = ws_cancelled_request(base_url)
    failed = http.post("/v1/chat/completions", json={"model": "mock-fail", "messages": MSG, "stream": True})
    rejected = http.post("/v1/chat/completions", json={"model": "no-such-model", "messages": MSG})
    assert cancelled["finish_reason"] == "cancelled" and failed.status_code == 200
    assert rejected.status_code == 404
    # remote: unary and streamed report exact usage; a stream cut before its usage chunk
    # is counted from the deltas received and flagged as estimated
    remote_unary = http.post("/v1/chat/completions", json={"model": "remote-gpt", "messages": MSG}).json()
    remote_stream = http.post("/v1/chat/completions", json={
        "model": "remote-gpt", "messages": MSG, "stream": True,
        "stream_options": {"include_usage": True}}).text
    remote_stream_usage = json.loads(
        [l for l in remote_stream.splitlines() if '"usage":{' in l][-1][6:])["usage"]
    fake_openai.enqueue(token_delay_s=0.3, reply_tokens=40)
    assert cut_remote_stream(base_url) == 2

    mock_usages = [unary["usage"], stream_usage, native["usage"]]
    prompt = sum(u["prompt_tokens"] for u in mock_usages)
    completion = sum(u["completion_tokens"] for u in mock_usages)
    assert completion == 5 + 7 + 3
    expected_cost = (prompt * PRICE_IN + completion * PRICE_OUT) / 1e6

    def usage() -> dict:
        return http.get("/v1/usage", params={"group_by": "model", "start": t0}).json()

    body = wait_until(lambda: (u := usage())["totals"]["requests"] >= 9 and u, timeout=15, interval=0.1)
    assert body["totals"]["requests"] == 9
    groups = {g["group"]: g for g in body["groups"]}
    m = groups["mock-5ms"]
    assert (m["requests"], m["errors"]) == (3, 0)
    assert (m["prompt_tokens"], m["completion_tokens"]) == (prompt, completion)
    assert m["cost_usd"] == pytest.approx(expected_cost, abs=1e-9)
    # every request that produced tokens has a TTFT (a unary one: when its response came)
    assert m["latency_ms"]["e2e"]["count"] == 3 and m["latency_ms"]["ttft"]["count"] == 3
    slow = groups["mock-slow"]
    assert slow["requests"] == 1 and slow["errors"] == 0  # cancelled is not an error...
    assert slow["completion_tokens"] == cancelled["usage"]["completion_tokens"] > 0  # ...but counted
    assert groups["mock-fail"]["errors"] == 1 and groups["mock-fail"]["completion_tokens"] == 3
    assert groups["-"]["errors"] == 1  # the rejected request
    remote = groups["remote-gpt"]
    exact = [remote_unary["usage"], remote_stream_usage]
    r_prompt = sum(u["prompt_tokens"] for u in exact)
    # + the deltas the gateway received for the cut stream before it learnt of the cut: at
    # least the 2 the client read. Behind HAProxy (troupe run's ingress) the cut reaches the
    # gateway when a write to the gone client fails, a delta or two later (0.3 s each).
    cut_counted = remote["completion_tokens"] - sum(u["completion_tokens"] for u in exact)
    assert 2 <= cut_counted <= 6, remote
    r_completion = sum(u["completion_tokens"] for u in exact) + cut_counted
    assert (remote["requests"], remote["errors"], remote["estimated_entries"]) == (3, 0, 1)
    assert remote["prompt_tokens"] == r_prompt
    by_provider = {g["group"]: g for g in http.get(
        "/v1/usage", params={"group_by": "provider", "start": t0}).json()["groups"]}
    assert remote["cost_usd"] == pytest.approx(
        (r_prompt * REMOTE_IN + r_completion * REMOTE_OUT) / 1e6, abs=1e-9), (remote, by_provider)
    assert by_provider["openai"]["requests"] == 3 and by_provider["local"]["requests"] == 5

    after = samples(http.get("/metrics").text)
    delta = lambda name, **kw: total(after, name, **kw) - total(before, name, **kw)  # noqa: E731
    assert delta("troupe_requests_total", model="mock-5ms") == 3
    assert delta("troupe_tokens_total", model="mock-5ms", kind="completion") == completion
    assert delta("troupe_tokens_total", model="mock-5ms", kind="prompt") == prompt
    assert delta("troupe_cost_usd_total", model="mock-5ms") == pytest.approx(expected_cost, abs=1e-9)
    assert delta("troupe_errors_total", model="mock-fail", code="INFERENCE_FAILED") == 1
    assert delta("troupe_errors_total", code="MODEL_NOT_FOUND") == 1
    assert delta("troupe_e2e_seconds_count", model="mock-5ms") == 3
    assert delta("troupe_ttft_seconds_count", model="mock-5ms") == 3
    assert delta("troupe_ttft_seconds_count", model="remote-gpt") == 3
    assert delta("troupe_queue_wait_seconds_count", model="mock-5ms") == 3
    assert delta("troupe_inter_token_seconds_count", model="mock-5ms") >= 6
    assert delta("troupe_requests_total", model="remote-gpt", provider="openai") == 3
    assert delta("troupe_cost_estimated_requests_total", model="remote-gpt") == 1
    assert delta("troupe_e2e_seconds_count", model="remote-gpt") == 3


def test_prometheus_text_passes_promtool(http: httpx.Client) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is missing: `make test` installs it (Debian package prometheus)")
    text = http.get("/metrics")
    assert text.headers["content-type"].startswith("text/plain")
    assert "troupe_requests_total" in text.text
    result = subprocess.run([promtool, "check", "metrics"], input=text.content,
                            capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_one_chat_request_is_one_connected_trace(http: httpx.Client) -> None:
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    r = http.post("/v1/chat/completions", headers={"traceparent": f"00-{trace_id}-{parent}-01"},
                  json={"model": "mock-5ms", "messages": MSG, "max_tokens": 4, "stream": True})
    assert r.status_code == 200

    def find():
        for trace in http.get("/traces", params={"limit": 50}).json()["data"]:
            if trace["trace_id"] == trace_id and trace["span_count"] >= 3:
                return trace
        return None

    trace = wait_until(find, timeout=20, interval=0.2)
    spans = trace["spans"]
    (gateway,) = [s for s in spans if s["parent_id"] == parent]
    (deployment,) = [s for s in spans if s["parent_id"] == gateway["span_id"]]
    (engine,) = [s for s in spans if s["parent_id"] == deployment["span_id"]]
    assert (gateway["role"], deployment["role"], engine["role"]) == ("gateway", "model", "model")
    assert (deployment["name"], engine["name"]) == ("deployment.stream", "engine.generate")


def test_custom_metrics(http: httpx.Client) -> None:
    ok = http.post("/metrics/custom", json={"name": "queue_jobs", "kind": "gauge", "value": 3,
                                            "labels": {"queue": "emails"}})
    assert ok.status_code == 200, ok.text
    text = http.get("/metrics").text
    assert 'troupe_custom_queue_jobs{queue="emails"} 3.0' in text
    for bad in ({"name": "bad name!", "kind": "gauge", "value": 1},
                {"name": "x", "kind": "histogram", "value": 1},
                {"name": "x", "kind": "gauge", "value": 1, "labels": {f"l{i}": "v" for i in range(20)}}):
        r = http.post("/metrics/custom", json=bad)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["code"] == "INVALID_REQUEST"


def test_usage_rejects_bad_queries(http: httpx.Client) -> None:
    assert http.get("/v1/usage", params={"group_by": "planet"}).json()["error"]["param"] == "group_by"
    assert http.get("/v1/usage", params={"start": "yesterday"}).status_code == 400


def test_grafana_dashboard_charts_metrics_that_exist(http: httpx.Client) -> None:
    import re
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "config" / "grafana-troupe.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    wanted = {re.sub(r"_(total|bucket|count|sum)$", "", name)
              for e in exprs for name in re.findall(r"troupe_[a-z0-9_]+", e)}
    assert len(wanted) >= 8
    http.post("/v1/chat/completions", json={"model": "mock-5ms", "messages": MSG, "max_tokens": 2})

    def absent() -> set[str]:
        families = {f.name for f in text_string_to_metric_families(http.get("/metrics").text)}
        return wanted - families

    wait_until(lambda: not absent(), timeout=10, interval=0.2)


def test_replicas_per_deployment_are_exported(http: httpx.Client) -> None:
    def running() -> float:
        snapshot = samples(http.get("/metrics").text)
        return total(snapshot, "troupe_replicas", deployment="LLM_mock-5ms", state="RUNNING")

    assert wait_until(running, timeout=15, interval=0.3) == 1


def test_in_flight_per_model_rises_while_a_request_runs(http: httpx.Client, base_url: str) -> None:
    key = ("troupe_in_flight_requests", (("deployment", "LLM_mock-slow"),))

    def in_flight() -> float:
        return samples(http.get("/metrics").text).get(key, -1.0)

    async def hold_one_request() -> None:
        async with connect(base_url.replace("http://", "ws://") + "/ws") as ws:
            await ws.send(json.dumps({"type": "inference", "id": "h", "model": "mock-slow", "prompt": "x"}))
            await asyncio.wait_for(ws.recv(), 10)  # first token: it is running
            await asyncio.to_thread(wait_until, lambda: in_flight() == 1, 10, 0.2)
            await ws.send(json.dumps({"type": "cancel", "id": "h"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "complete":
                pass

    asyncio.run(hold_one_request())
    wait_until(lambda: in_flight() == 0, timeout=10, interval=0.2)


def test_engine_queue_gauges_reach_metrics_and_troupe_status(
    http: httpx.Client, base_url: str,
) -> None:
    """Each local replica exports its engine's queue (depth, running, expected wait) to
    /metrics, and ``troupe status`` shows it per deployment (issue 17)."""
    from serve_app.cli.status import collect_status, engine_queues_from_metrics, format_status

    def running() -> float:
        return total(samples(http.get("/metrics").text), "troupe_engine_running_requests",
                     deployment="LLM_mock-slow", model="mock-slow")

    async def hold_one_request() -> dict[str, Any]:
        async with connect(base_url.replace("http://", "ws://") + "/ws") as ws:
            await ws.send(json.dumps({"type": "inference", "id": "q", "model": "mock-slow",
                                      "prompt": "x"}))
            await asyncio.wait_for(ws.recv(), 10)  # first token: it is running
            await asyncio.to_thread(wait_until, lambda: running() == 1, 10, 0.2)
            queues = engine_queues_from_metrics(base_url)
            await ws.send(json.dumps({"type": "cancel", "id": "q"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 10))["type"] != "complete":
                pass
            return queues or {}

    queues = asyncio.run(hold_one_request())
    assert queues["LLM_mock-slow"] == {"queue_depth": 0, "running": 1, "expected_wait_s": 0}
    snapshot = samples(http.get("/metrics").text)
    for name in ("troupe_engine_queue_depth", "troupe_engine_expected_wait_seconds"):
        assert any(n == name and dict(labels).get("model") == "mock-slow"
                   for n, labels in snapshot), name
    rows = {r["deployment"]: r for r in collect_status(None, None, queues)}
    assert rows["LLM_mock-slow"]["engine_queue"]["running"] == 1
    assert rows["Gateway"]["engine_queue"] is None
    table = format_status(list(rows.values())).splitlines()
    assert "ENGINE-Q" in table[0] and "WAIT-S" in table[0]
    wait_until(lambda: running() == 0, timeout=10, interval=0.2)


def test_status_shows_replicas_nodes_resources_and_in_flight(base_url: str) -> None:
    from serve_app.settings import load_settings
    from serve_app.cli.status import collect_status, format_status, in_flight_from_metrics
    from tests.mock_app import APP_ARGS

    httpx.post(base_url + "/inference", json={"model": "mock-5ms", "prompt": "x", "max_tokens": 2})
    flights = wait_until(lambda: (f := in_flight_from_metrics(base_url)).get("LLM_mock-5ms") == 0
                         and f, timeout=10, interval=0.2)
    rows = {r["deployment"]: r for r in collect_status({"troupe": load_settings(APP_ARGS)}, flights)}
    row = rows["LLM_mock-5ms"]
    assert row["application"] == "troupe" and row["status"] == "HEALTHY"
    assert row["replicas"] == {"RUNNING": 1}
    assert sum(row["nodes"].values()) == 1  # placed on a node Ray knows
    assert row["num_cpus"] == 0.1 and row["num_gpus"] == 0 and row["target_replicas"] == 1
    assert row["in_flight"] == 0
    assert rows["Gateway"]["replicas"] == {"RUNNING": 1}
    table = format_status(list(rows.values()))
    assert "troupe/LLM_mock-5ms" in table and "fixed 1" in table

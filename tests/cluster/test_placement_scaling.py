"""Placement and autoscaling of Troupe's deployments across (declared) GPU nodes.

One Troupe app on the local cluster (see conftest): mock engines whose replicas reserve
GPUs exactly as the vLLM deployments in config/gpu.yaml do.

* ``chat``: one GPU per replica, autoscaling 0..2 (scale to zero, short delays);
* ``tp2``: a tensor-parallel replica: two ``{GPU: 1}`` bundles, ``STRICT_PACK``;
* ``nowhere``: needs 4 GPUs per replica, which no node has: its cold start never ends,
  so a request must give up after ``cold_start_timeout_s`` with 503 + Retry-After;
* ``remote``: an OpenAI-compatible upstream (never called), so the session actor starts.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from typing import Any

import httpx
import pytest

from tests.cluster.conftest import (
    HEAD_RESOURCE,
    LocalCluster,
    deploy_troupe,
    gateway_options,
    metric_value,
    sse_events,
    undeploy,
)
from tests.conftest import wait_until

CHAT_DEPLOYMENT = "LLM_chat"
TP_DEPLOYMENT = "LLM_tp2"

AUTOSCALING = {
    "min_replicas": 0,
    "max_replicas": 2,
    "initial_replicas": 0,
    "target_ongoing_requests": 1,
    "upscale_delay_s": 0.5,
    "downscale_delay_s": 3,
    "look_back_period_s": 1,
    "cold_start_timeout_s": 60,
}

MODELS: list[dict[str, Any]] = [
    {
        "id": "chat",
        "engine": {"type": "mock", "token_delay_ms": 20, "min_output_tokens": 20,
                   "max_output_tokens": 20},
        "deployment": {
            "max_ongoing_requests": 4,
            "ray_actor_options": {"num_cpus": 0.05, "num_gpus": 1},
            "autoscaling": AUTOSCALING,
            "graceful_shutdown_timeout_s": 1,
        },
    },
    {
        "id": "tp2",
        "engine": {"type": "mock", "token_delay_ms": 1},
        "deployment": {
            "num_replicas": 1,
            "max_ongoing_requests": 8,
            "ray_actor_options": {"num_cpus": 0, "num_gpus": 0},
            "placement_group_bundles": [{"GPU": 1, "CPU": 0.05}, {"GPU": 1, "CPU": 0.05}],
            "placement_group_strategy": "STRICT_PACK",
            "graceful_shutdown_timeout_s": 1,
        },
    },
    {
        "id": "nowhere",
        "engine": {"type": "mock", "token_delay_ms": 1},
        "deployment": {
            "max_ongoing_requests": 4,
            "ray_actor_options": {"num_cpus": 0.05, "num_gpus": 4},
            "autoscaling": {**AUTOSCALING, "max_replicas": 1, "cold_start_timeout_s": 3},
            "graceful_shutdown_timeout_s": 1,
        },
    },
    {
        # A remote model served inside the gateway (on the head; no replica of its own),
        # its key held by the session actor. Never called: it makes the session actor start.
        "id": "remote",
        "run_in": "gateway",
        "engine": {"type": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "gpt-x",
                   "api_key_env": "TROUPE_TEST_OPENAI_KEY"},
    },
]


@pytest.fixture(scope="module")
def app(local_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory):
    ledger = tmp_path_factory.mktemp("state") / "ledger.db"
    deploy_troupe(local_cluster, {
        "models": MODELS,
        "gateway": gateway_options(),
        "metrics": {"store_url": "sqlite:///" + str(ledger).lstrip("/"),
                    "flush_interval_s": 0.1, "serve_poll_interval_s": 0},
    })
    local_cluster.wait_replicas(TP_DEPLOYMENT, 1, timeout=60)
    yield local_cluster
    undeploy()


def _chat(client: httpx.Client, model: str = "chat", max_tokens: int = 8) -> httpx.Response:
    return client.post("/v1/chat/completions", json={
        "model": model, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hello"}],
    })


# --------------------------------------------------------------------------- placement


def test_head_runs_the_gateway_and_metrics_actor_and_no_model_replica(app: LocalCluster):
    by_role: dict[str, list[str]] = {}
    for actor in app.alive_actors():
        name = actor.get("Name") or actor["ActorClassName"]
        by_role.setdefault(app.role_of(actor["Address"]["NodeID"]), []).append(name)
    head = by_role["head"]
    assert any(n.startswith("SERVE_REPLICA::troupe#Gateway#") for n in head), head
    assert {"troupe-metrics", "troupe-model-state", "troupe-session"} <= set(head), head
    assert not [n for n in head if n.startswith("SERVE_REPLICA::troupe#LLM_")], head
    # Nothing of Troupe's own runs anywhere else but model replicas.
    for role, names in by_role.items():
        if role != "head":
            assert all(n.startswith("SERVE_REPLICA::troupe#LLM_") for n in names
                       if n.startswith(("SERVE_REPLICA::troupe#", "troupe-"))), names


def test_the_gateway_holds_the_head_only_resource(app: LocalCluster):
    import ray

    head_total = ray.cluster_resources()[HEAD_RESOURCE]
    assert head_total == 1  # declared by the head node only
    wait_until(lambda: ray.available_resources().get(HEAD_RESOURCE, 0) < head_total,
               timeout=10)


def test_a_tensor_parallel_replica_packs_its_bundles_on_one_gpu_node(app: LocalCluster):
    import ray
    from ray.util import placement_group_table

    [replica_role] = app.replica_roles(TP_DEPLOYMENT)
    groups = [
        g for g in placement_group_table().values()
        if g["state"] == "CREATED" and len(g["bundles"]) == 2
        and all(b.get("GPU") == 1 for b in g["bundles"].values())
    ]
    [group] = groups
    assert group["strategy"] == "STRICT_PACK"
    bundle_roles = {app.role_of(n) for n in group["bundles_to_node_id"].values()}
    # Both bundles on the one node with two GPUs; the replica actor sits there too.
    assert bundle_roles == {"gpu-tp"} and replica_role == "gpu-tp"
    assert ray.available_resources().get("GPU", 0) <= 2  # gpu-tp's two GPUs are taken

    with httpx.Client(base_url=app.url, timeout=30) as client:
        assert _chat(client, "tp2").status_code == 200


# --------------------------------------------------------------------------- autoscaling


def _cold_starts(client: httpx.Client) -> float:
    return metric_value(client.get("/metrics").text, "troupe_cold_start_ttft_seconds_count",
                        {"model": "chat"})


def _load(url: str, stop: Any) -> int:
    """One client streaming chat requests back to back until ``stop`` is set."""
    done = 0
    with httpx.Client(base_url=url, timeout=60) as client:
        while not stop.is_set():
            with client.stream("POST", "/inference/stream", json={
                "model": "chat", "prompt": "load", "max_tokens": 20,
            }) as response:
                assert response.status_code == 200
                events = list(sse_events(response))
            assert events[-1].get("done") is True, events[-1]
            done += 1
    return done


def test_scales_from_zero_up_across_gpu_nodes_and_back_to_zero(app: LocalCluster):
    import threading

    assert app.running_replicas(CHAT_DEPLOYMENT) == 0  # initial_replicas: 0
    with httpx.Client(base_url=app.url, timeout=90) as client:
        # /health reports the model as scaled to zero without waking it up.
        health = client.get("/health")
        assert health.status_code == 200, health.text
        [chat] = [m for m in health.json()["models"] if m["id"] == "chat"]
        assert chat["status"] == "scaled_to_zero" and not chat["loaded"]
        assert app.running_replicas(CHAT_DEPLOYMENT) == 0

        # Cold start: the request waits for a replica (bounded), then is served.
        assert _chat(client).status_code == 200
        [role] = app.replica_roles(CHAT_DEPLOYMENT)
        assert role not in ("head", "gpu-tp"), role
        wait_until(lambda: _cold_starts(client) == 1, timeout=10, interval=0.2)

        # Load: four streams back to back, target one per replica -> max_replicas (2).
        # One GPU each, so the two replicas must be on the two single-GPU nodes.
        stop = threading.Event()
        with cf.ThreadPoolExecutor(4) as pool:
            load_at = time.monotonic()
            clients = [pool.submit(_load, app.url, stop) for _ in range(4)]
            try:
                app.wait_replicas(CHAT_DEPLOYMENT, 2, timeout=60)
                up_s = time.monotonic() - load_at
            finally:
                stop.set()
            served = sum(f.result(timeout=60) for f in clients)
        assert served >= 4
        roles = app.replica_roles(CHAT_DEPLOYMENT)
        # Two single-GPU nodes (gpu-a, gpu-b, or a node test_node_failure added).
        assert len(set(roles)) == 2 and not {"head", "gpu-tp"} & set(roles), roles

        # Idle: back to zero replicas, GPUs released.
        idle_at = time.monotonic()
        app.wait_replicas(CHAT_DEPLOYMENT, 0, timeout=60)
        down_s = time.monotonic() - idle_at

        # The next request after zero is another (measured) cold start.
        started = time.monotonic()
        response = _chat(client)
        cold_s = time.monotonic() - started
        assert response.status_code == 200, response.text
        wait_until(lambda: _cold_starts(client) == 2, timeout=10, interval=0.2)
        ttft_sum = metric_value(client.get("/metrics").text,
                                "troupe_cold_start_ttft_seconds_sum", {"model": "chat"})
        print(f"1 -> 2 replicas {up_s:.1f}s after the load began; 2 -> 0 {down_s:.1f}s after "
              f"it stopped; cold start from zero: {cold_s:.2f}s to the whole answer, "
              f"mean cold-start TTFT of the two {ttft_sum / 2:.2f}s")


def test_no_replica_within_the_cold_start_timeout_answers_503_with_retry_after(
    app: LocalCluster,
):
    # "nowhere" wants 4 GPUs per replica: its replica can never start here.
    with httpx.Client(base_url=app.url, timeout=30) as client:
        started = time.monotonic()
        response = _chat(client, "nowhere")
        waited = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert response.headers["retry-after"] == "3"
        error = response.json()["error"]
        assert error["code"] == "overloaded"
        assert "cold_start_timeout_s" in error["message"]
        assert 3 <= waited < 12

        # The native stream route says the same before any event is sent.
        response = client.post("/inference/stream", json={"model": "nowhere", "prompt": "x"})
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "OVERLOADED"
        assert response.json()["error"]["details"]["reason"] == "cold_start"


# --------------------------------------------------------------------------- troupe status


def test_status_shows_replicas_nodes_gpus_queue_and_targets(app: LocalCluster):
    from serve_app.settings import load_settings
    from serve_app.cli.status import collect_status, format_status, in_flight_from_metrics

    settings = {"troupe": load_settings({"models": MODELS, "gateway": gateway_options()})}
    # Without the config's bundles: the TP replica's GPUs are read off its placement group.
    settings["troupe"].models[1].deployment.__dict__["placement_group_bundles"] = None
    # (gauges reach the metrics actor within the 0.1 s flush interval: wait for quiet)
    wait_until(lambda: not any((in_flight_from_metrics(app.url) or {"?": 1}).values()),
               timeout=5, interval=0.1)
    rows = {r["deployment"]: r for r in collect_status(settings, in_flight_from_metrics(app.url))}

    tp = rows[TP_DEPLOYMENT]
    assert tp["replicas"] == {"RUNNING": 1} and tp["target_replicas"] == 1
    assert tp["num_gpus"] == 2 and tp["gpus_in_use"] == 2  # both bundles' GPUs
    [node] = tp["nodes"]
    assert node.endswith("/" + app.node_id("gpu-tp")[:8])
    assert tp["autoscaling"] is None

    gateway = rows["Gateway"]
    [node] = gateway["nodes"]
    assert node.endswith("/" + app.node_id("head")[:8])
    assert gateway["num_gpus"] == 0

    nowhere = rows["LLM_nowhere"]
    assert nowhere["autoscaling"] == {"min": 0, "max": 1, "target_ongoing_requests": 1,
                                      "cold_start_timeout_s": 3}
    assert nowhere["num_gpus"] == 4 and nowhere["in_flight"] == 0 and nowhere["queued"] == 0
    chat = rows[CHAT_DEPLOYMENT]
    assert chat["autoscaling"]["max"] == 2 and chat["max_ongoing_requests"] == 4

    table = format_status(list(rows.values()))
    print(table)
    assert "troupe/LLM_tp2" in table and "2/2" in table and "fixed 1" in table
    assert "auto 0..1" in table


def test_status_counts_queued_requests_while_a_model_cold_starts(app: LocalCluster):
    """Requests waiting for a replica of a model at zero show up as queued."""
    from serve_app.cli.status import collect_status, in_flight_from_metrics

    with cf.ThreadPoolExecutor(2) as pool, httpx.Client(base_url=app.url) as client:
        waiting = [pool.submit(_chat, client, "nowhere") for _ in range(2)]
        # Both wait up to the 3 s cold-start timeout: meanwhile status counts them.
        wait_until(
            lambda: next(r for r in collect_status(None, in_flight_from_metrics(app.url))
                         if r["deployment"] == "LLM_nowhere")["queued"] == 2,
            timeout=2.5, interval=0.05,
        )
        assert [f.result(timeout=10).status_code for f in waiting] == [503, 503]


def test_troupe_status_command_on_the_cluster(app: LocalCluster, tmp_path):
    """The CLI end to end: its own driver joins the cluster, reads Serve and /metrics."""
    import json
    import os
    import subprocess
    import sys

    import yaml

    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": app.http_port},
        "applications": [{"name": "troupe", "route_prefix": "/",
                          "import_path": "serve_app.build.app:build_app",
                          "args": {"models": MODELS, "gateway": gateway_options()}}],
    }))
    out = subprocess.run(
        [sys.executable, "-m", "serve_app.cli.main", "status", str(config),
         "--address", app.cluster.address, "--json"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["deployment"]: r for r in json.loads(out.stdout)}
    assert rows[TP_DEPLOYMENT]["gpus_in_use"] == 2
    assert rows["LLM_nowhere"]["autoscaling"]["cold_start_timeout_s"] == 3
    assert rows["Gateway"]["in_flight"] == 0  # read from the gateway's /metrics

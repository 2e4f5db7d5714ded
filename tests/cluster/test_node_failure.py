"""A GPU worker node dies under load: no hang, clear errors, service continues, recovery.

``steady`` has two one-GPU replicas, so Serve spreads them over two GPU nodes. Streams
are running on both when every process of one of those nodes (its raylet, object store
and the replica's worker) is killed. Streams on the dead node must end with an SSE
``error`` event (INFERENCE_FAILED, naming the dead replica) within seconds; streams on
the other replica finish; new requests are served; Serve brings the deployment back to
two replicas on the GPUs that are left (a spare node is added first, so the session's
other modules keep their capacity).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import threading
import time
from typing import Any

import httpx
import pytest

from tests.cluster.conftest import (
    LocalCluster,
    deploy_troupe,
    gateway_options,
    metric_value,
    undeploy,
)
from tests.conftest import wait_until

DEPLOYMENT = "LLM_steady"
STREAMS = 6
TOKENS = 150  # x 40 ms = 6 s per stream: still running when the node dies

MODELS: list[dict[str, Any]] = [
    {
        "id": "steady",
        "engine": {"type": "mock", "token_delay_ms": 40, "min_output_tokens": TOKENS,
                   "max_output_tokens": TOKENS},
        "default_max_tokens": TOKENS,
        "deployment": {
            "num_replicas": 2,
            "max_ongoing_requests": 8,
            "ray_actor_options": {"num_cpus": 0.05, "num_gpus": 1},
            "health_check_period_s": 1,
            "graceful_shutdown_timeout_s": 1,
        },
    },
]


@pytest.fixture(scope="module")
def app(local_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory):
    local_cluster.add_gpu_node("gpu-spare", 1)
    ledger = tmp_path_factory.mktemp("state") / "ledger.db"
    deploy_troupe(local_cluster, {
        "models": MODELS,
        "gateway": {**gateway_options(), "stream_idle_timeout_s": 30},
        "metrics": {"store_url": "sqlite:///" + str(ledger).lstrip("/"),
                    "flush_interval_s": 0.1, "serve_poll_interval_s": 0},
    })
    local_cluster.wait_replicas(DEPLOYMENT, 2, timeout=60)
    yield local_cluster
    undeploy()


def _stream(url: str, started: threading.Barrier) -> dict[str, Any]:
    """One native stream: how it ended ("done" or "error") and how long it took.

    ``tokens``: token events seen (a lagging reader gets merged deltas), or the usage
    of a finished stream.
    """
    tokens = 0
    with httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=30)) as client:
        with client.stream("POST", "/inference/stream",
                           json={"model": "steady", "prompt": "long story"}) as response:
            assert response.status_code == 200
            event = "message"
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: "):]
                elif line.startswith("data: "):
                    data = json.loads(line[len("data: "):])
                    if event == "error":
                        return {"end": "error", "error": data["error"], "tokens": tokens,
                                "at": time.monotonic()}
                    if data.get("done"):
                        return {"end": "done", "finish": data["finish_reason"],
                                "tokens": data["usage"]["completion_tokens"],
                                "at": time.monotonic()}
                    tokens += 1
                    if tokens == 1:
                        started.wait(timeout=30)
    return {"end": "cut", "tokens": tokens, "at": time.monotonic()}


def test_killing_a_gpu_node_under_load(app: LocalCluster):
    roles = app.replica_roles(DEPLOYMENT)
    assert len(set(roles)) == 2 and "head" not in roles, roles
    victim = roles[0]

    started = threading.Barrier(STREAMS + 1)
    with cf.ThreadPoolExecutor(STREAMS) as pool:
        streams = [pool.submit(_stream, app.url, started) for _ in range(STREAMS)]
        started.wait(timeout=60)  # every stream has its first token: all in flight
        killed_at = time.monotonic()
        app.kill_node(victim)
        results = [f.result(timeout=60) for f in streams]  # none hangs

    errors = [r for r in results if r["end"] == "error"]
    done = [r for r in results if r["end"] == "done"]
    assert len(errors) + len(done) == STREAMS, results  # every stream ended cleanly
    assert errors, f"no stream was on the killed node {victim}: {results}"
    for r in errors:
        assert r["error"]["code"] == "INFERENCE_FAILED", r
        assert "died" in r["error"]["message"]
        assert r["tokens"] < TOKENS
        assert r["at"] - killed_at < 15  # the dead replica's streams end promptly
    for r in done:
        assert r["finish"] == "stop" and r["tokens"] == TOKENS
    print(f"killed {victim}: {len(errors)} stream(s) ended in an error event, the last "
          f"{max(r['at'] for r in errors) - killed_at:.2f}s after the kill; "
          f"{len(done)} finished normally")

    with httpx.Client(base_url=app.url, timeout=60) as client:
        # New requests are served by the surviving replica (and then the replacement).
        for i in range(4):
            response = client.post("/v1/completions", json={
                "model": "steady", "prompt": f"after {i}", "max_tokens": 3,
            })
            assert response.status_code == 200, response.text

        # The failures were recorded as errors of the model.
        wait_until(
            lambda: metric_value(client.get("/metrics").text, "troupe_errors_total",
                                 {"model": "steady", "code": "INFERENCE_FAILED"})
            == len(errors),
            timeout=10, interval=0.2,
        )

    # Serve replaces the lost replica on a GPU node that is still alive.
    recovered_at = time.monotonic()
    app.wait_replicas(DEPLOYMENT, 2, timeout=90)
    roles_after = app.replica_roles(DEPLOYMENT)
    assert victim not in roles_after and "head" not in roles_after, roles_after
    print(f"back to 2 replicas on {roles_after} "
          f"{time.monotonic() - killed_at:.1f}s after the kill "
          f"({time.monotonic() - recovered_at:.1f}s of waiting here)")

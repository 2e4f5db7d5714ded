"""A local multi-node Ray cluster whose worker nodes declare GPUs (no real GPU needed).

Ray accepts ``num_gpus`` on a CPU machine, so placement, autoscaling across nodes and
node failure are tested with several raylets on this host and mock engines whose
replicas reserve those GPUs:

==========  ====  ====  ==========================================================
node        CPUs  GPUs  custom resources
==========  ====  ====  ==========================================================
head        2     0     ``troupe_head: 1`` (the gateway asks for a sliver of it)
gpu-a       1     1
gpu-b       1     1
gpu-tp      1     2     (room for one tensor-parallel replica: 2 bundles, STRICT_PACK)
==========  ====  ====  ==========================================================

This suite starts its OWN Ray cluster, so it runs in its own pytest process
(``pytest tests/cluster``; ``make test`` runs it as a second invocation). Collected
together with other test folders, its tests skip themselves rather than fight the
session's ``ray.init(address="local")`` for the driver. Nothing here uses the shared
``serve_instance`` fixture.

Serve's autoscaling metrics are pushed every 0.5 s here (instead of every 10 s), and a
dead node is noticed after ~1.5 s, so the suite stays short.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import httpx
import pytest

from serve_app.cli.serve_env import fast_ingress_environment, make_haproxy_folder
from tests.conftest import free_port, wait_until

_REPO = str(Path(__file__).resolve().parents[2])
HEAD_RESOURCE = "troupe_head"
GPU_NODES = {"gpu-a": 1, "gpu-b": 1, "gpu-tp": 2}

_HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this folder's tests ``cluster``; skip them when other folders share the run."""
    mine = [i for i in items if _HERE in Path(str(i.fspath)).resolve().parents]
    for item in mine:
        item.add_marker(pytest.mark.cluster)
    if len(mine) != len(items):
        skip = pytest.mark.skip(
            reason="tests/cluster starts its own Ray cluster: run it in its own process "
            "(pytest tests/cluster), as `make test` does"
        )
        for item in mine:
            item.add_marker(skip)


class LocalCluster:
    """The running cluster: its nodes by role, plus helpers the tests share."""

    def __init__(self, cluster: Any, nodes: dict[str, Any], http_port: int) -> None:
        self.cluster = cluster
        #: role -> ray._private.node.Node ("head", "gpu-a", ...)
        self.nodes = nodes
        self.http_port = http_port
        self.url = f"http://127.0.0.1:{http_port}"

    # ------------------------------------------------------------------ nodes

    def node_id(self, role: str) -> str:
        return self.nodes[role].node_id

    def role_of(self, node_id: str) -> str:
        for role, node in self.nodes.items():
            if node.node_id == node_id:
                return role
        return f"unknown:{node_id[:8]}"

    def add_gpu_node(self, role: str, num_gpus: int = 1) -> Any:
        node = self.cluster.add_node(**_worker_args(num_gpus))
        self.nodes[role] = node
        return node

    def kill_node(self, role: str) -> None:
        """Kill every process of a worker node at once (raylet, object store, workers)."""
        node = self.nodes.pop(role)
        self.cluster.remove_node(node, allow_graceful=False)

    # ----------------------------------------------------------------- actors

    @staticmethod
    def alive_actors() -> list[dict[str, Any]]:
        """Ray's actor table (GCS; no dashboard needed), ALIVE actors only."""
        from ray._private import state as ray_state

        return list(ray_state.actors(actor_state_name="ALIVE").values())

    def replica_roles(self, deployment: str, app: str = "troupe") -> list[str]:
        """Node role of each ALIVE replica of ``app#deployment``, sorted."""
        prefix = f"SERVE_REPLICA::{app}#{deployment}#"
        return sorted(
            self.role_of(a["Address"]["NodeID"])
            for a in self.alive_actors()
            if (a.get("Name") or "").startswith(prefix)
        )

    @staticmethod
    def running_replicas(deployment: str, app: str = "troupe") -> int:
        from ray import serve

        status = serve.status().applications.get(app)
        if status is None or deployment not in status.deployments:
            return 0
        states = status.deployments[deployment].replica_states or {}
        return sum(n for s, n in states.items() if str(getattr(s, "value", s)) == "RUNNING")

    def wait_replicas(self, deployment: str, count: int, timeout: float) -> None:
        wait_until(
            lambda: self.running_replicas(deployment) == count
            and len(self.replica_roles(deployment)) == count,
            timeout=timeout,
            interval=0.25,
        )


def _worker_args(num_gpus: int) -> dict[str, Any]:
    return {
        "num_cpus": 1,
        "num_gpus": num_gpus,
        "object_store_memory": 80 * 1024 * 1024,
        # Own ports, so nodes on one host never collide (0 = any free port).
        "dashboard_agent_listen_port": free_port(),
        "min_worker_port": 0,
        "max_worker_port": 0,
    }


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    """Head (CPU only, ``troupe_head``) + three GPU-declaring worker nodes, and Serve."""
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        pytest.skip("a Ray driver is already connected in this process")
    # Set before any raylet starts: every node and worker process inherits them.
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The workers import this checkout's code (the driver's own sys.path is not enough).
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_REPO, os.environ.get("PYTHONPATH", "")) if p
    )
    # The ingress `troupe run` gives users: Serve's HAProxy, on the head (HeadOnly below).
    haproxy_folder = make_haproxy_folder()
    os.environ.update(fast_ingress_environment(os.environ, haproxy_folder))
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "num_gpus": 0,
            "resources": {HEAD_RESOURCE: 1},
            "gcs_server_port": free_port(),
            "include_dashboard": False,
            "dashboard_agent_listen_port": free_port(),
            "object_store_memory": 100 * 1024 * 1024,
            "_system_config": {
                # Notice a killed node in ~1.5 s instead of ~30 s.
                "health_check_initial_delay_ms": 0,
                "health_check_period_ms": 500,
                "health_check_timeout_ms": 500,
                "health_check_failure_threshold": 3,
                "enable_worker_prestart": False,
            },
        },
    )
    nodes = {"head": cluster.head_node}
    try:
        for role, gpus in GPU_NODES.items():
            nodes[role] = cluster.add_node(**_worker_args(gpus))
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        port = free_port()
        # One proxy, on the head, next to the gateway (config/gpu.yaml does the same).
        serve.start(
            proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port}
        )
        yield LocalCluster(cluster, nodes, port)
    finally:
        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(haproxy_folder, ignore_errors=True)


def deploy_troupe(local: LocalCluster, args: dict[str, Any], timeout: float = 90) -> None:
    """Deploy the Troupe app (``serve_app.build.app:build_app``) and wait for /health."""
    from ray import serve

    from serve_app.build.app import build_app

    serve.run(build_app(args), name="troupe", route_prefix="/", blocking=False)
    wait_until(lambda: _healthy(local.url), timeout=timeout, interval=0.5)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code in (200, 503)
    except httpx.HTTPError:
        return False


def undeploy(timeout: float = 60) -> None:
    from ray import serve

    serve.delete("troupe")
    wait_until(lambda: "troupe" not in serve.status().applications, timeout=timeout, interval=0.25)


def gateway_options() -> dict[str, Any]:
    """The gateway on the head node: a sliver of the head-only resource, a bit of CPU."""
    return {"ray_actor_options": {"num_cpus": 0.05, "resources": {HEAD_RESOURCE: 0.01}}}


def metric_value(text: str, name: str, labels: Optional[dict[str, str]] = None) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text)."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                total += sample.value
    return total


def sse_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    import json

    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[len("data: "):])


def now() -> float:
    return time.monotonic()

"""`troupe run` as a user starts it (its own Ray, its own terminal): a lean local head
behind Serve's HAProxy ingress that still answers a streamed chat and still shows the
replicas' log lines, and that Ctrl-C stops whole, HAProxy included (issue 20).

Set ``TROUPE_CLI_RUN_CONFIG=config/local.yaml`` to run it on the bundled models (slower:
they load before the gateway is healthy); the default is the mock config.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from openai import OpenAI

from bench.idle_cpu import _troupe_command, label_of, wait_healthy
from bench.users_systems import RunningSystem, SystemSpec

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / os.environ.get("TROUPE_CLI_RUN_CONFIG", "config/mock.yaml")
MODEL = {"mock.yaml": "mock-5ms", "local.yaml": "mock-fast"}[CONFIG.name]


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSystem]:
    spec = SystemSpec("troupe-run", _troupe_command(CONFIG), model=MODEL, ready_timeout_s=600)
    system = RunningSystem(spec, 0, tmp_path_factory.mktemp("troupe-run"))
    system.start()
    try:
        wait_healthy(system.port, 600)
        yield system
    finally:
        assert system.stop() == []  # Ctrl-C alone shut everything down


def _labelled(system: RunningSystem) -> dict[str, psutil.Process]:
    """The system's processes by label, leaving out any that end while being read (a
    worker Ray starts and stops meanwhile: a CI run once failed on one)."""
    labelled = {}
    for process in system.processes():
        try:
            labelled[label_of(process.cmdline(), process.name())] = process
        except psutil.NoSuchProcess:
            continue
    return labelled


def _gateway_posts(system: RunningSystem) -> int:
    """Serve's access-log lines for POSTs to the gateway replica seen on the console
    (Ray prefixes each with the replica's name and pid)."""
    text = system.log_path.read_text(errors="replace")
    return sum("ServeReplica:troupe:Gateway" in x and "-- POST " in x for x in text.splitlines())


def test_a_streamed_chat_answers_and_the_replica_logs_reach_the_terminal(
        running: RunningSystem) -> None:
    seen = _gateway_posts(running)
    client = OpenAI(base_url=f"http://127.0.0.1:{running.port}/v1", api_key="unused",
                    max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=8,
        stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert len(text.split()) == 8
    # Serve's access log line is written by the gateway replica's process; Ray's log
    # monitor brings it to `troupe run`'s terminal.
    deadline = time.monotonic() + 30
    while _gateway_posts(running) <= seen:
        assert time.monotonic() < deadline, running.log_path.read_text()[-3000:]
        time.sleep(0.5)


def test_the_head_runs_without_the_autoscaler_monitor(
        running: RunningSystem) -> None:
    labels = list(_labelled(running))
    # Kept, it feeds the terminal: Troupe's lean log monitor, not Ray's 10 Hz one.
    assert any("lean_log_monitor.py" in x for x in labels), labels
    assert not any(x.endswith(" log_monitor.py") for x in labels), labels
    assert not any(x.endswith("monitor.py") and "log_monitor" not in x for x in labels)
    assert any(x.startswith("ray::ServeReplica:troupe:Gateway") for x in labels)


def test_requests_reach_the_gateway_through_serve_haproxy_ingress(
        running: RunningSystem) -> None:
    # `troupe run`'s default ingress: HAProxy (its config in this run's own folder,
    # which the fixture's stop() also checks for leftovers), managed by Serve's actor.
    labels = list(_labelled(running))
    assert any(x.startswith("haproxy") for x in labels), labels
    assert any(x.startswith("ray::HAProxyManager") for x in labels), labels
    owner = next(c.pid for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == running.port)
    assert psutil.Process(owner).name() == "haproxy"


def test_rays_api_server_runs_minimal_and_serves_proxy_slows_uvicorns_tick(
        running: RunningSystem) -> None:
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR

    from serve_app.cli.serve_launch import WORKER_SETUP_HOOK

    processes = _labelled(running)
    (api_server,) = [p for label, p in processes.items() if "dashboard.py" in label]
    assert "--minimal" in api_server.cmdline()
    # Ray runs the hook as each worker starts, and ends a worker whose hook fails: the
    # proxy running with it configured is the hook having run.
    (proxy,) = [p for label, p in processes.items() if label.startswith("ray::ProxyActor")]
    assert proxy.environ().get(WORKER_PROCESS_SETUP_HOOK_ENV_VAR) == WORKER_SETUP_HOOK

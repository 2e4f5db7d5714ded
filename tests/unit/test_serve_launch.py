"""`troupe run` starts its local Ray head without the process a single-node gateway never
uses (issue 20's idle CPU): the autoscaler monitor, unless the user asked for the Ray
dashboard or points at a running cluster; and its log monitor polls less when idle."""

from __future__ import annotations

import os
from typing import Any

import pytest
import ray
from ray._private import ray_constants, services
from ray._private.node import Node
from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
from ray.serve.scripts import cli

from serve_app.build import uvicorn_tick
from serve_app.cli import lean_log_monitor, serve_launch
from serve_app.cli.serve_launch import (
    LEAN_HEAD_SKIPS,
    LEAN_LOG_MONITOR,
    WORKER_SETUP_HOOK,
    lean_head,
)


class Head:
    """A stand-in head node: records which of its processes were started."""

    def __init__(self) -> None:
        self.started: list[str] = []

    def start_monitor(self) -> None:
        self.started.append("monitor")

    def start_api_server(self, *, include_dashboard: Any, raise_on_failure: bool) -> None:
        self.started.append("api_server")

    def start_log_monitor(self) -> None:
        self.started.append("log_monitor")

    def start_head_processes(self) -> None:  # the order Ray's Node uses
        self.start_monitor()
        self.start_api_server(include_dashboard=False, raise_on_failure=False)
        self.start_log_monitor()


def test_a_lean_head_starts_no_autoscaler_monitor_but_keeps_the_log_monitor_and_api_server():
    head = Head()
    with lean_head(Head):
        head.start_head_processes()
    # The log monitor brings replica output to the terminal; without the API server the
    # dashboard agent would log an error every second.
    assert head.started == ["api_server", "log_monitor"]
    head.started.clear()
    head.start_head_processes()  # afterwards the class is whole again
    assert head.started == ["monitor", "api_server", "log_monitor"]


def test_the_class_is_restored_when_starting_ray_fails():
    with pytest.raises(RuntimeError):
        with lean_head(Head):
            raise RuntimeError("ray.init failed")
    head = Head()
    head.start_head_processes()
    assert head.started == ["monitor", "api_server", "log_monitor"]


def test_the_installed_ray_still_has_what_the_lean_head_skips():
    # A Ray upgrade that renames these would silently bring the processes back.
    assert set(LEAN_HEAD_SKIPS) <= set(vars(Node))


def _launch(monkeypatch, env: dict[str, str]) -> list[dict[str, Any]]:
    """Runs serve_launch.main with ``env``; returns what each ray.init saw."""
    for key in ("RAY_ADDRESS", "TROUPE_RAY_DASHBOARD", WORKER_PROCESS_SETUP_HOOK_ENV_VAR):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls: list[dict[str, Any]] = []

    def init(**kwargs: Any) -> None:
        skipped = [n for n in LEAN_HEAD_SKIPS if vars(Node)[n] is serve_launch._skipped]
        calls.append({**kwargs, "skipped": skipped,
                      "hook": os.environ.get(WORKER_PROCESS_SETUP_HOOK_ENV_VAR)})

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(cli, "main", lambda argv, **kwargs: 0)
    assert serve_launch.main(["run", "config.yaml"]) == 0
    return calls


def test_troupe_run_starts_a_lean_head_without_the_dashboard(monkeypatch):
    (call,) = _launch(monkeypatch, {})
    assert call["include_dashboard"] is False
    assert call["skipped"] == list(LEAN_HEAD_SKIPS)
    # Every worker of this Ray, Serve's proxy included, slows uvicorn's tick at start:
    # the hook is in the environment the local Ray's processes inherit.
    assert call["hook"] == WORKER_SETUP_HOOK
    assert all(vars(Node)[n] is not serve_launch._skipped for n in LEAN_HEAD_SKIPS)


def test_the_ray_dashboard_brings_the_whole_head_back(monkeypatch):
    (call,) = _launch(monkeypatch, {"TROUPE_RAY_DASHBOARD": "1"})
    assert call["include_dashboard"] is True and call["skipped"] == []


def test_a_running_cluster_is_left_to_serve_run(monkeypatch):
    assert _launch(monkeypatch, {"RAY_ADDRESS": "ray://head:10001"}) == []


def _log_monitor_command(monkeypatch) -> list[str]:
    """The command Ray's own ``services.start_log_monitor`` starts its process with."""
    started: list[list[str]] = []
    monkeypatch.setattr(services, "start_ray_process",
                        lambda command, process_type, **kwargs: started.append(command))
    services.start_log_monitor("/s", "/s/logs", "127.0.0.1:1", "127.0.0.1",
                               stdout_filepath="/s/logs/lm.out",
                               stderr_filepath="/s/logs/lm.err")
    (command,) = started
    return command


def test_the_lean_head_runs_the_lean_log_monitor_with_rays_own_arguments(monkeypatch):
    ray_command = _log_monitor_command(monkeypatch)
    # A Ray upgrade that moved the script would silently bring Ray's 10 Hz poll back.
    assert ray_command[1:3] == ["-u", services.os.path.join(
        services.RAY_PATH, services.RAY_PRIVATE_DIR, "log_monitor.py")]
    started: list[tuple[list[str], str]] = []

    class Services:
        @staticmethod
        def start_ray_process(command: list[str], process_type: str, **kwargs: Any) -> None:
            started.append((command, process_type))

    with lean_head(Head, Services):
        Services.start_ray_process(ray_command, ray_constants.PROCESS_TYPE_LOG_MONITOR)
        Services.start_ray_process(["raylet", "--x"], ray_constants.PROCESS_TYPE_RAYLET)
    Services.start_ray_process(ray_command, ray_constants.PROCESS_TYPE_LOG_MONITOR)
    (lean, _), raylet, (restored, _) = started
    assert lean == [ray_command[0], "-u", LEAN_LOG_MONITOR, *ray_command[3:]]
    assert raylet == (["raylet", "--x"], ray_constants.PROCESS_TYPE_RAYLET)
    assert restored == ray_command  # afterwards Ray's own script again


def test_the_lean_log_monitor_accepts_every_argument_ray_passes(monkeypatch):
    command = _log_monitor_command(monkeypatch)
    args = lean_log_monitor._arguments(command[3:])
    assert (args.gcs_address, args.logs_dir, args.stdout_filepath) == (
        "127.0.0.1:1", "/s/logs", "/s/logs/lm.out")


def test_the_worker_setup_hook_names_the_uvicorn_tick_setup():
    # Ray imports the hook by this dotted path in every worker; a rename would make each
    # worker fail its start.
    from ray._common.utils import load_class

    assert load_class(WORKER_SETUP_HOOK) is uvicorn_tick.worker_process_setup


def _api_server_command(monkeypatch, include_dashboard: bool) -> list[str]:
    """The command Ray's own ``services.start_api_server`` starts its process with."""
    started: list[list[str]] = []

    def start(command: list[str], process_type: str, **kwargs: Any) -> None:
        started.append(command)
        raise RuntimeError("stop before Ray waits for the server's address")

    monkeypatch.setattr(services, "start_ray_process", start)
    # raise_on_failure=False: Ray logs the failure and returns.
    services.start_api_server(
        include_dashboard, False, "127.0.0.1", "127.0.0.1:1", "00" * 28, "127.0.0.1",
        "/tmp", "/s/logs", "/s", port=8265, stdout_filepath="/s/logs/d.out",
        stderr_filepath="/s/logs/d.err")
    (command,) = started
    return command


def test_the_lean_head_runs_rays_api_server_minimal_unless_the_dashboard_is_on(monkeypatch):
    without = _api_server_command(monkeypatch, include_dashboard=False)
    with_ui = _api_server_command(monkeypatch, include_dashboard=True)
    # What Ray passes without the dashboard; the lean head keys on the first flag.
    assert "--disable-frontend" in without and "--minimal" not in without
    started: list[list[str]] = []

    class Services:
        @staticmethod
        def start_ray_process(command: list[str], process_type: str, **kwargs: Any) -> None:
            started.append(command)

    with lean_head(Head, Services):
        Services.start_ray_process(without, ray_constants.PROCESS_TYPE_DASHBOARD)
        Services.start_ray_process(with_ui, ray_constants.PROCESS_TYPE_DASHBOARD)
        Services.start_ray_process([*without, "--minimal"], ray_constants.PROCESS_TYPE_DASHBOARD)
    lean, dashboard, already = started
    # Minimal: no self-metrics every 5 s (psutil reading smaps), no 4 Hz loop-lag probe,
    # no Prometheus thread; it still publishes its address for the dashboard agent.
    assert lean == [*without, "--minimal"]
    assert dashboard == with_ui
    assert already.count("--minimal") == 1


def test_a_setup_hook_the_user_set_wins(monkeypatch):
    (call,) = _launch(monkeypatch, {WORKER_PROCESS_SETUP_HOOK_ENV_VAR: "mine.setup"})
    assert call["hook"] == "mine.setup"


def test_rays_workers_still_run_the_hook_named_in_that_variable():
    # The variable is Ray's own (the runtime_env field becomes it); a Ray that stopped
    # reading it would silently bring the proxy's 10 Hz tick back.
    import inspect

    from ray._private.workers import default_worker

    assert "WORKER_PROCESS_SETUP_HOOK_ENV_VAR" in inspect.getsource(default_worker)

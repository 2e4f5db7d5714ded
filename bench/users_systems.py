"""Start and stop the systems ``bench.users_bench`` compares, each as its own process tree.

Each Ray-based system gets its own Ray instance: a private ``RAY_TMPDIR`` (so its session
directory, sockets and logs are its own, and every process it spawned can be found by that
path), its own HTTP port, and its own direct-ingress port windows. Only one system runs at
a time; :meth:`RunningSystem.stop` ends the whole tree (Ctrl-C first, the way a user stops
``serve run``, then SIGTERM/SIGKILL by PID) and checks that no process of it is left, so a
stray raylet never poisons the next system.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import psutil

from bench.loadgen import LoadSpec, run_load
from serve_app.cli.serve_env import haproxy_environment

__all__ = ["SystemSpec", "RunningSystem", "free_port", "troupe_config", "baseline_config"]

MODEL_ID = "mock-5ms"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def troupe_config(port: int, run_in: str = "deployment") -> dict[str, Any]:
    """A one-model Troupe config, as a user would write it (mock engine, 5 ms per token)."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "troupe",
            "route_prefix": "/",
            "import_path": "serve_app.build.app:build_app",
            "args": {
                "models": [{
                    "id": MODEL_ID,
                    "engine": {"type": "mock", "token_delay_ms": 5, "ignore_eos": True},
                    "run_in": run_in,
                    "deployment": {"max_ongoing_requests": 64,
                                   "ray_actor_options": {"num_cpus": 0.5}},
                }],
                "gateway": {"max_ongoing_requests": 1000,
                            "ray_actor_options": {"num_cpus": 0.5}},
            },
        }],
    }


def baseline_config(port: int) -> dict[str, Any]:
    """The bare Serve app (``bench.baseline_app``), same resources, same ``serve run``."""
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{
            "name": "baseline",
            "route_prefix": "/",
            "import_path": "bench.users_apps:baseline_builder",
            "args": {"ingress_num_cpus": 0.5, "model_num_cpus": 0.5},
        }],
    }


@dataclass
class SystemSpec:
    """How to start one system: ``command(port, workdir)`` -> argv; extra env."""

    name: str
    command: Callable[[int, Path], list[str]]
    env: dict[str, str] = field(default_factory=dict)
    uses_ray: bool = True
    #: Extra processes to start first (e.g. LiteLLM's upstream): argv(port) per helper.
    helpers: list[Callable[[int], list[str]]] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)
    model: str = MODEL_ID
    ready_timeout_s: float = 240.0


class RunningSystem:
    """One started system: its processes, its URL, and how to stop all of it."""

    def __init__(self, spec: SystemSpec, index: int, log_dir: Path) -> None:
        self.spec = spec
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix=f"ub{index}-", dir="/tmp"))
        self.log_path = log_dir / f"{spec.name}.log"
        self.procs: list[subprocess.Popen] = []
        self.url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        self.started_s: Optional[float] = None

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        env["RAY_TMPDIR"] = str(self.workdir)  # this instance's session dir, sockets, logs
        env["TROUPE_STATE_DIR"] = str(self.workdir / "state")  # a new user's empty state
        env["RAY_USAGE_STATS_ENABLED"] = "0"
        # Direct ingress (RAY_SERVE_THROUGHPUT_OPTIMIZED=1) binds replica ports in
        # 30000-31000/40000-41000; a window of this system's own avoids any other cluster.
        base = 20000 + (self.port % 90) * 100
        env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(base))
        env.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(base + 100))
        env.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT", str(base - 10000))
        env.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT", str(base - 9900))
        env.update(self.spec.env)
        if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":  # ports and files of its own
            env.update(haproxy_environment(env, str(self.workdir / "hap")))
        return env

    def start(self) -> None:
        """Start the helpers and the system, and wait until a real request answers 200."""
        t0 = time.monotonic()
        env = self._env()
        log = open(self.log_path, "a")
        log.write(f"\n==== start {time.strftime('%H:%M:%S')} port {self.port}\n")
        log.flush()
        for make_argv in self.spec.helpers:
            helper_port = free_port()
            env[f"UB_HELPER_PORT_{len(self.procs)}"] = str(helper_port)
            self.procs.append(subprocess.Popen(
                make_argv(helper_port), env=env, cwd=self.workdir, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))
            env["UB_UPSTREAM"] = f"http://127.0.0.1:{helper_port}/v1"
        self.procs.append(subprocess.Popen(
            self.spec.command(self.port, self.workdir), env=env, cwd=REPO, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
        self._wait_ready(self.spec.ready_timeout_s)
        self.started_s = time.monotonic() - t0

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        last = "not started"
        while time.monotonic() < deadline:
            if self.procs[-1].poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited ({self.procs[-1].returncode}); "
                                   f"see {self.log_path}")
            spec = LoadSpec(self.url, self.spec.model, stream=False, max_requests=1,
                            duration_s=5, max_tokens=1, headers=self.spec.headers,
                            request_timeout_s=10)
            results, _ = asyncio.run(run_load(spec))
            if results and results[0].ok:
                return
            last = results[0].error if results else "no result"
            time.sleep(1.0)
        raise RuntimeError(f"{self.spec.name} not ready in {timeout_s:.0f}s: {last}")

    def processes(self) -> list[psutil.Process]:
        """Every live process of this system: the trees it started, and any process whose
        command line names its private Ray directory or its HAProxy folder (Ray daemons
        re-parent to init)."""
        found: dict[int, psutil.Process] = {}
        for proc in self.procs:
            try:
                root = psutil.Process(proc.pid)
                found[root.pid] = root
                for child in root.children(recursive=True):
                    found[child.pid] = child
            except psutil.NoSuchProcess:
                continue
        # Ray's private folder, and `troupe run`'s HAProxy folder (/tmp/troupe<pid>-*).
        markers = [str(self.workdir), *(f"/troupe{proc.pid}-" for proc in self.procs)]
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(m in arg for arg in p.info["cmdline"] or () for m in markers):
                    found.setdefault(p.pid, p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        me = os.getpid()
        return [p for pid, p in found.items() if pid != me]

    def stop(self, grace_s: float = 45.0) -> list[str]:
        """Stop everything: SIGINT to each tree (``serve run`` then shuts Serve and Ray
        down), SIGTERM, then SIGKILL by PID; returns what had to be killed."""
        survivors = self.processes()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGINT)
                except ProcessLookupError:
                    pass
        killed: list[str] = []
        psutil.wait_procs(survivors, timeout=grace_s)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            alive = [p for p in self.processes() if p.is_running()]
            if not alive:
                break
            for p in alive:
                try:
                    killed.append(f"{p.pid}:{p.name()}:{sig.name}")
                    p.send_signal(sig)
                except psutil.NoSuchProcess:
                    continue
            psutil.wait_procs(alive, timeout=10)
        for proc in self.procs:  # reap our direct children
            if proc.poll() is None:
                proc.wait(timeout=5)
        left = [p for p in self.processes() if p.is_running()]
        if left:
            raise RuntimeError(f"{self.spec.name}: processes left after stop: "
                               f"{[p.pid for p in left]}")
        shutil.rmtree(self.workdir, ignore_errors=True)
        return killed


def python_cmd(*args: str) -> list[str]:
    return [sys.executable, *args]

"""Idle CPU of a running gateway, per process: what Troupe and Ray burn with no traffic.

Starts ``troupe run CONFIG`` the way ``make run`` does (its own Ray instance, see
``bench.users_systems``), waits until ``/health`` answers 200 (every model loaded), lets it
settle, then reads every process's CPU time (``psutil.cpu_times``: user + system) at the
start and the end of a window and reports the difference as a percentage of one core, per
process and in total. Nothing is sent to the gateway during the window.

Run::

    .venv/bin/python -m bench.idle_cpu                       # config/local.yaml, 60 s
    .venv/bin/python -m bench.idle_cpu --config config/mock.yaml --window 30
    .venv/bin/python -m bench.idle_cpu --env RAY_SERVE_CONTROL_LOOP_INTERVAL_S=0.1

Results: ``bench/results/<UTC>-idle-cpu.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import psutil
import yaml

from bench.users_systems import RunningSystem, SystemSpec

__all__ = ["main", "label_of", "cpu_percent_by_process", "wait_healthy"]

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent


def label_of(cmdline: list[str], name: str) -> str:
    """A readable label for a process: Ray's proctitle (``ray::ServeReplica:app:Gateway``),
    a Ray daemon's program name, or the command's first two words."""
    if cmdline and cmdline[0].startswith("ray::"):
        return cmdline[0].split(" ")[0]
    head = " ".join(Path(a).name for a in cmdline[:3]) if cmdline else name
    for daemon in ("raylet", "gcs_server", "dashboard.py", "agent.py", "log_monitor.py",
                   "monitor.py", "runtime_env/agent", "default_worker.py", "troupe", "serve"):
        if daemon in " ".join(cmdline[:3]):
            return head[:80]
    return head[:80] or name


def cpu_percent_by_process(
    before: dict[Any, tuple[str, float]], after: dict[Any, tuple[str, float]], window_s: float
) -> dict[str, float]:
    """Per label, CPU used in the window as a percentage of one core (summed over PIDs).

    A process that appeared during the window counts from zero; one that vanished counts
    nothing (its time is not readable any more).
    """
    out: dict[str, float] = {}
    for pid, (label, cpu) in after.items():
        used = cpu - before.get(pid, (label, 0.0))[1]
        out[label] = out.get(label, 0.0) + 100.0 * max(0.0, used) / window_s
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def snapshot(procs: list[psutil.Process]) -> dict[int, tuple[str, float]]:
    out: dict[int, tuple[str, float]] = {}
    for p in procs:
        try:
            with p.oneshot():
                t = p.cpu_times()
                out[p.pid] = (label_of(p.cmdline(), p.name()),
                              t.user + t.system + t.children_user + t.children_system)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def snapshot_threads(procs: list[psutil.Process]) -> dict[tuple[int, int], tuple[str, float]]:
    """Per thread of every process: ``(pid, tid) -> ("process label / thread name", cpu_s)``.

    Ray names its native threads (``worker.io``, ``grpc_global_tim``...), so this tells Ray's
    C++ loops from Python code without a profiler.
    """
    out: dict[tuple[int, int], tuple[str, float]] = {}
    for p in procs:
        try:
            label = label_of(p.cmdline(), p.name())
            for t in p.threads():
                try:
                    comm = Path(f"/proc/{p.pid}/task/{t.id}/comm").read_text().strip()
                except OSError:
                    continue
                out[(p.pid, t.id)] = (f"{label} / {comm}", t.user_time + t.system_time)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def _health_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(port: int, timeout_s: float) -> None:
    """Wait until the gateway on ``port`` answers ``/health`` with 200 (every model loaded)."""
    health = f"http://127.0.0.1:{port}/health"
    deadline = time.monotonic() + timeout_s
    while not _health_ok(health):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{health} not 200 in {timeout_s}s (models loading?)")
        time.sleep(2)


def _troupe_command(config: Path):
    def command(port: int, workdir: Path) -> list[str]:
        data = yaml.safe_load(config.read_text())
        data.setdefault("http_options", {})["port"] = port
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return [str(BIN / "troupe"), "run", str(path)]

    return command


def _first_text_model(config: Path) -> str:
    data = yaml.safe_load(config.read_text())
    for app in data["applications"]:
        for m in (app.get("args") or {}).get("models", []):
            if m.get("modality", "text") == "text" and m.get("engine", {}).get("type") == "mock":
                return m["id"]
    raise SystemExit(f"{config}: idle_cpu needs a mock text model to know the gateway is up")


def measure(args: argparse.Namespace) -> dict[str, Any]:
    config = Path(args.config)
    env = dict(kv.split("=", 1) for kv in args.env)
    spec = SystemSpec("troupe-idle", _troupe_command(config), env=env,
                      model=_first_text_model(config), ready_timeout_s=args.ready_timeout)
    log_dir = Path(f"/tmp/idle-cpu-{int(time.time())}")
    log_dir.mkdir(exist_ok=True)
    system = RunningSystem(spec, 0, log_dir)
    try:
        system.start()
        wait_healthy(system.port, args.ready_timeout)
        time.sleep(args.settle)
        procs = system.processes()
        t0, before, before_t = time.monotonic(), snapshot(procs), snapshot_threads(procs)
        time.sleep(args.window)
        window = time.monotonic() - t0
        procs = system.processes()
        after, after_t = snapshot(procs), snapshot_threads(procs)
        machine = psutil.cpu_times_percent(interval=1.0)
        per_request = _cpu_per_request(system, args.requests, before, after, window) \
            if args.requests else None
        then = _run_then(args.then, system) if args.then else None
    finally:
        system.stop()
    per = cpu_percent_by_process(before, after, window)
    threads = cpu_percent_by_process(before_t, after_t, window)
    return {"threads": {k: round(v, 2) for k, v in list(threads.items())[:args.top_threads]},
            "config": str(config), "env": env, "window_s": round(window, 1),
            "total_pct_of_one_core": round(sum(per.values()), 2),
            "processes": {k: round(v, 2) for k, v in per.items()},
            "machine_idle_pct_after": machine.idle, "then": then,
            "cpu_ms_per_request": per_request}


def _cpu_per_request(system: RunningSystem, n: int, idle_before: dict[int, tuple[str, float]],
                     idle_after: dict[int, tuple[str, float]], idle_s: float) -> dict[str, Any]:
    """``--requests``: CPU per request of every process, from ``n`` unary chat requests
    (c=8, 16 tokens) after the idle window, less each process's idle rate."""
    import asyncio

    from bench.loadgen import LoadSpec, run_load, summarize

    procs = system.processes()
    t0, before = time.monotonic(), snapshot(procs)
    spec = LoadSpec(system.url, system.spec.model, stream=False, concurrency=8,
                    max_requests=n, duration_s=600.0, max_tokens=16)
    results, wall = asyncio.run(run_load(spec))
    after, load_s = snapshot(system.processes()), time.monotonic() - t0
    idle = cpu_percent_by_process(idle_before, idle_after, idle_s)
    busy = cpu_percent_by_process(before, after, load_s)
    done = summarize(results, wall)
    ok = max(1, len(results) - int(done.get("errors", 0)))
    per = {label: round(max(0.0, pct - idle.get(label, 0.0)) / 100.0 * load_s * 1000.0 / ok, 3)
           for label, pct in busy.items()}
    return {"requests": ok, "errors": done.get("errors", 0), "seconds": round(load_s, 1),
            "total_ms": round(sum(per.values()), 2),
            "processes": dict(sorted(per.items(), key=lambda kv: -kv[1]))}


def _run_then(command: str, system: RunningSystem) -> dict[str, Any]:
    """``--then``: a shell command run against the measured gateway after the window, in
    its Ray instance's environment (``$TROUPE_URL``: the gateway)."""
    import subprocess

    env = {**system._env(), "TROUPE_URL": f"http://127.0.0.1:{system.port}"}
    done = subprocess.run(command, shell=True, env=env, capture_output=True, text=True,
                          timeout=120)
    return {"command": command, "rc": done.returncode,
            "output": (done.stdout + done.stderr)[-4000:]}


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Idle CPU of `troupe run {report['config']}`", "",
             f"Window {report['window_s']} s, no traffic; env {report['env'] or '{}'}.",
             f"**Total: {report['total_pct_of_one_core']}% of one core.**", "",
             "| process | % of one core |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in report["processes"].items()]
    lines += ["", "Busiest threads (process / thread name):", "",
              "| thread | % of one core |", "|---|---|"]
    lines += [f"| `{k}` | {v} |" for k, v in report.get("threads", {}).items()]
    if report.get("cpu_ms_per_request"):
        load = report["cpu_ms_per_request"]
        lines += ["", f"CPU per request ({load['requests']} unary chat requests, c=8, 16 tokens, "
                  f"{load['seconds']} s, idle rate subtracted): **{load['total_ms']} ms in all**",
                  "", "| process | CPU ms per request |", "|---|---|"]
        lines += [f"| `{k}` | {v} |" for k, v in load["processes"].items() if v > 0]
    if report.get("then"):
        then = report["then"]
        lines += ["", f"After the window: `{then['command']}` exited {then['rc']}:", "",
                  "```", then["output"].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.idle_cpu", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config/local.yaml")
    p.add_argument("--window", type=float, default=60.0, help="seconds measured")
    p.add_argument("--settle", type=float, default=15.0, help="seconds after ready, unmeasured")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--env", action="append", default=[], help="KEY=VALUE for troupe run")
    p.add_argument("--tag", default="idle-cpu")
    p.add_argument("--requests", type=int, default=0,
                   help="after the idle window, CPU per request over this many requests")
    p.add_argument("--then", help="shell command run after the window ($TROUPE_URL set)")
    p.add_argument("--top-threads", type=int, default=40, help="threads listed, busiest first")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwind to measure()'s finally: the gateway stops

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    report = measure(args)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{stamp}-{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"wrote {stem}.md / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

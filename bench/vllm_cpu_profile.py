"""Where the CPU goes at c=16: per-process CPU seconds of one system of ``vllm_cpu_bench``.

Starts one system (``troupe-vllm``, ``troupe-vllm-deployment`` or ``vllm-serve``, as ``bench.vllm_cpu_bench`` starts
it), warms it up, runs ``--duration`` seconds of 16 streamed chats and prints each of its
processes' CPU seconds over that window (and per finished request), busiest first; with
``--py-spy`` it also records the gateway, model replica, proxy and engine core with py-spy
(raw collapsed stacks beside the log). Run under the shared lock::

    flock /tmp/troupe-ray.lock .venv/bin/python -m bench.vllm_cpu_profile troupe-vllm
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import psutil

from bench.users_systems import REPO, RunningSystem
from bench.vllm_cpu_bench import _level, system_specs

__all__ = ["main"]

_SPIED = ("Gateway", "LLM_", "ProxyActor", "EngineCore")


def _cpu(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def _label(proc: psutil.Process) -> str:
    try:
        return f"{proc.pid} {proc.name()}"
    except psutil.Error:
        return str(proc.pid)


def _spy(procs: list[psutil.Process], seconds: int, out: Path) -> list[subprocess.Popen]:
    spy = Path(sys.executable).parent / "py-spy"
    return [subprocess.Popen([str(spy), "record", "--pid", str(p.pid), "-d", str(seconds), "-r", "50",
                              "--nonblocking", "-f", "raw", "-o", str(out / f"spy-{p.pid}.txt")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for p in procs if any(k in p.name() for k in _SPIED)]


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_cpu_profile", description=__doc__.split("\n")[0])
    parser.add_argument("system", choices=("troupe-vllm", "troupe-vllm-deployment", "vllm-serve"))
    parser.add_argument("--vllm-venv", type=Path, default=REPO / ".venv-vllm")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--py-spy", action="store_true")
    args = parser.parse_args(argv)
    spec = system_specs(args.vllm_venv)[args.system]
    out = Path("/tmp") / f"vllm-cpu-profile-{args.system}-{int(time.time())}"
    out.mkdir()
    system = RunningSystem(spec, 0, out)
    try:
        system.start()
        _level(system.url, spec.model, 4, 4.0)  # warm-up
        before = {p.pid: (p, _cpu(p)) for p in system.processes()}
        spies = _spy([p for p, _ in before.values()], int(args.duration) - 3, out) if args.py_spy else []
        t0 = time.monotonic()
        stats = _level(system.url, spec.model, 16, args.duration)
        wall = time.monotonic() - t0
        rows = []
        for proc, start in before.values():
            try:
                rows.append((_cpu(proc) - start, _label(proc)))
            except psutil.Error:
                continue
        rows.sort(reverse=True)
        ok = max(1, stats["ok"])
        print(f"{args.system} c=16: {stats['output_tokens_per_s']:.1f} tokens/s, {stats['ok']} requests, "
              f"{stats['tokens_per_chunk']:.2f} tokens/chunk, {wall:.1f} s")
        print("| process | CPU s | % of a core | ms per request |\n|---|---:|---:|---:|")
        for cpu, label in rows[:10]:
            print(f"| {label} | {cpu:.2f} | {cpu / wall * 100:.0f} | {cpu / ok * 1000:.0f} |")
        for proc in spies:
            proc.wait(timeout=60)
    finally:
        system.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

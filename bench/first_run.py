"""A new user's first ``make run``: fresh clone, empty pip/uv caches, until the first token.

Clones this checkout's HEAD into a temporary directory, runs ``make run`` there with empty
``PIP_CACHE_DIR`` and ``UV_CACHE_DIR`` (and, with ``--fresh-home``, an empty ``HOME``, so
the once-only GGUF conversion runs too), timestamps every line it prints, and streams
``POST /inference/stream`` until the first token arrives. Then it stops ``make run`` with
Ctrl-C, as a user would, and kills by PID anything of that run still alive.

Run::

    .venv/bin/python -m bench.first_run [--fresh-home] [--config config/local.yaml]

Results: ``bench/results/<UTC>-first-run.json`` (phase times); the timestamped output of
``make run`` goes to a file in the temp directory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import psutil

__all__ = ["main"]

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
#: Output lines that end a phase (the first line containing the text).
MARKS = {
    "installed": "touch .venv/.installed",
    "serve_starting": "troupe: starting",
    "ready": "Troupe is up",
}


def first_token(url: str, model: str, deadline: float) -> Optional[float]:
    """Seconds (monotonic) at which the first streamed token arrived, or None."""
    body = json.dumps({"model": model, "prompt": "Say hello", "max_tokens": 8}).encode()
    while time.monotonic() < deadline:
        req = urllib.request.Request(url + "/inference/stream", data=body,
                                     headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                for line in resp:
                    if line.startswith(b"data:") and b'"token"' in line:
                        return time.monotonic()
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    return None


def _reader(proc: subprocess.Popen, t0: float, log: list[tuple[float, str]]) -> None:
    assert proc.stdout is not None
    for raw in proc.stdout:
        log.append((round(time.monotonic() - t0, 2), raw.rstrip()))


def _stop(proc: subprocess.Popen, marker: str) -> list[int]:
    """Ctrl-C to make's process group, then SIGKILL by PID whatever of this run is left."""
    try:
        os.killpg(proc.pid, signal.SIGINT)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    left = []
    for p in psutil.process_iter(["pid", "cmdline", "environ"]):
        try:
            text = " ".join(p.info["cmdline"] or ()) + " " + str((p.info["environ"] or {}).get("RAY_TMPDIR", ""))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if marker in text and p.pid != os.getpid():
            left.append(p.pid)
            p.kill()
    return left


def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="fr-", dir="/tmp"))
    clone = work / "troupe"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env.update(PIP_CACHE_DIR=str(work / "pip-cache"), UV_CACHE_DIR=str(work / "uv-cache"),
               RAY_TMPDIR=str(work / "ray"), TROUPE_STATE_DIR=str(work / "state"),
               PATH=":".join(p for p in env["PATH"].split(":") if ".venv" not in p))
    if args.fresh_home:
        env["HOME"] = str(work / "home")
        os.makedirs(env["HOME"])
    log: list[tuple[float, str]] = []
    t0 = time.monotonic()
    proc = subprocess.Popen(["make", "run", f"CONFIG={args.config}"], cwd=clone, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    threading.Thread(target=_reader, args=(proc, t0, log), daemon=True).start()
    try:
        token_at = first_token("http://127.0.0.1:8000", args.model, t0 + args.timeout)
    finally:
        left = _stop(proc, str(work))
    marks = {name: next((t for t, line in log if text in line), None)
             for name, text in MARKS.items()}
    log_path = Path(tempfile.gettempdir()) / f"first-run-{work.name}.log"
    log_path.write_text("\n".join(f"{t:8.2f} {line}" for t, line in log) + "\n")
    report = {"first_token_s": round(token_at - t0, 1) if token_at else None,
              "phases_s": marks, "fresh_home": args.fresh_home, "config": args.config,
              "killed_after_stop": len(left)}
    print(f"make run's output, timestamped: {log_path}")
    shutil.rmtree(work, ignore_errors=True)
    return report


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.first_run", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="config/local.yaml")
    p.add_argument("--model", default="smollm2-135m", help="streamed from for the first token")
    p.add_argument("--fresh-home", action="store_true", help="empty HOME too (GGUF conversion)")
    p.add_argument("--timeout", type=float, default=900.0)
    args = p.parse_args(argv)
    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)  # unwind to run()'s finally: make run is stopped

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    report = run(args)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"{stamp}-first-run.json"
    path.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    print(f"wrote {path}")
    return 0 if report["first_token_s"] else 1


if __name__ == "__main__":
    sys.exit(main())

"""The ``troupe`` command: run, validate, status, prepare, keys.

``troupe run CONFIG`` validates the config, starts ``serve run CONFIG`` as a child
process, waits until ``/health`` answers, and prints the URL and an example request.
Ctrl-C (or SIGTERM) is passed on to ``serve run``, which shuts Serve and Ray down.

A first run converts the bundled GGUF model (20-40 s of one core) in a background
``troupe prepare`` while Ray and Serve start on the other core; the model's replica waits
for that conversion's lock instead of converting again (issue 20's two-minute first run).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Optional

from serve_app.cli.keys import add_keys_parser
from serve_app.cli.serve_config import read_serve_config, validate
from serve_app.cli.serve_env import make_haproxy_folder, serve_environment
from serve_app.settings import ConfigError, TransformersEngineConfig, TroupeSettings

__all__ = ["main", "validate", "local_cpu_problem", "port_problem", "start_conversions"]


def local_cpu_problem(apps: list[TroupeSettings], cpus: Optional[int] = None) -> Optional[str]:
    """Why a local `serve run` of these apps would hang, or None.

    `serve run` without ``RAY_ADDRESS`` starts a local Ray with one CPU per core; a
    replica whose reserved CPUs do not fit is never scheduled, and the gateway waits
    for it forever. (Against a cluster, its autoscaler may add nodes: no check.)
    """
    if os.environ.get("RAY_ADDRESS"):
        return None
    cpus = cpus or os.cpu_count() or 1
    asked = round(sum(app.cpus_at_start() for app in apps), 3)
    if asked <= cpus:
        return None
    return (
        f"the config reserves {asked} Ray CPUs at start (replicas' ray_actor_options.num_cpus "
        f"and the actors' actor_num_cpus), but this machine has {cpus}: some replica would "
        "never be scheduled. Lower the num_cpus values (a reservation, not a thread count; "
        "fractions are fine) or run against a cluster (RAY_ADDRESS)."
    )


def port_problem(host: str, port: int, config: Path) -> Optional[str]:
    """Why the gateway could not listen on ``host:port`` here, or None.

    Checked before a local Ray starts: otherwise Serve's HAProxy (or its proxy) fails to
    bind only once every model has loaded, and says so in retried tracebacks while
    ``serve run`` waits. (Against a cluster the port is the cluster's business: no check.)
    """
    if os.environ.get("RAY_ADDRESS") or port == 0:
        return None
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As servers bind (HAProxy, uvicorn): a closed connection's TIME_WAIT is no conflict.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return (f"cannot listen on {host}:{port} ({exc.strerror or exc}): another "
                    "gateway (an earlier `make run`?) or another server holds it. Stop it, "
                    f"or set http_options.port in {config} to a free port.")
    return None


def start_conversions(apps: list[TroupeSettings]) -> list[subprocess.Popen]:
    """Start ``troupe prepare`` in the background for each cache root that still lacks
    the converted bundled model; return the processes (none when all are converted).

    The replica that needs the model takes the same file lock (``gguf_cache``), so it
    waits for this conversion rather than repeating it, and converts itself if this one
    fails. Output goes to the terminal, like ``make models``.
    """
    from deployments.engines.gguf_cache import conversion_pending

    pending = {model.engine.cache_dir for app in apps for model in app.models
               if isinstance(model.engine, TransformersEngineConfig)
               and not model.engine.model_path and conversion_pending(model.engine)}
    started = []
    for cache_dir in sorted(pending, key=str):
        print("troupe: converting the bundled model in the background (once, 20-40 s)",
              flush=True)
        command = [sys.executable, "-m", "serve_app.cli.main", "prepare"]
        # SIGINT restored to the default, as for `serve run` below: started from a shell's
        # background job it is ignored, and the conversion could not be interrupted.
        started.append(subprocess.Popen(
            command + (["--cache-dir", cache_dir] if cache_dir else []),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
    return started


def _stop(processes: list[subprocess.Popen]) -> None:
    """Interrupt what is still running of ``processes`` (a conversion cleans up its
    temporary folder on KeyboardInterrupt) and reap them."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(url: str, child: subprocess.Popen, timeout_s: float) -> Optional[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and child.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            if exc.code == 503:  # up, but a model is still loading
                pass
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(1)
    return None


def _banner(url: str, health: dict) -> str:
    model = health["models"][0]["id"] if health.get("models") else "MODEL"
    return f"""
  Troupe is up: {url}
    browser: {url}/   (the playground: chat, stop, latency and cost)
    models : {', '.join(m['id'] for m in health.get('models', []))}
    health : curl {url}/health
    chat   : curl {url}/v1/chat/completions -H 'content-type: application/json' \\
               -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "What is the capital of France?"}}], "max_tokens": 32}}'
    stream : curl -N {url}/inference/stream -H 'content-type: application/json' \\
               -d '{{"model": "{model}", "prompt": "Tell me a story", "max_tokens": 48}}'
    openai : OpenAI(base_url="{url}/v1", api_key="unused")
    ws     : {url.replace('http', 'ws', 1)}/ws
  Auth is OFF (loopback only, no keys configured). Ctrl-C stops the gateway.
"""


def cmd_run(args: argparse.Namespace) -> int:
    path = Path(args.config)
    try:
        config = read_serve_config(path)
    except ConfigError as exc:
        print(f"troupe: {exc}", file=sys.stderr)
        return 2
    problem = local_cpu_problem(list(config.apps.values()))
    if problem is not None:
        print(f"troupe: {problem}", file=sys.stderr)
        return 2
    host, port = config.host, config.port
    problem = port_problem(host, port, path)
    if problem is not None:
        print(f"troupe: {problem}", file=sys.stderr)
        return 2
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    # Ray/Serve tuned for an idle-cheap gateway behind Serve's HAProxy ingress, whose files
    # go in a folder of this run's own (troupe<pid>-*), removed at exit.
    haproxy_folder = make_haproxy_folder()
    env = serve_environment(os.environ, haproxy_folder)
    conversions = start_conversions(list(config.apps.values()))
    print(f"troupe: starting `serve run {path}` (gateway on {url}) ...", flush=True)
    # `serve run` gets its own session, so a terminal's Ctrl-C reaches it once (through
    # us), and SIGINT restored to the default: a shell starts background jobs with SIGINT
    # ignored, and Python would then never raise KeyboardInterrupt, which is how
    # `serve run` shuts Serve and Ray down cleanly.
    child = subprocess.Popen(
        [sys.executable, "-m", "serve_app.cli.serve_launch", "run", str(path)],
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )

    def forward(signum, _frame):
        # Both Ctrl-C and SIGTERM become SIGINT: `serve run` cleans up on KeyboardInterrupt,
        # while Ray's own SIGTERM handler exits without shutting Serve down.
        if child.poll() is None:
            child.send_signal(signal.SIGINT)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    health = _wait_healthy(url, child, args.ready_timeout)
    if health is not None:
        print(_banner(url, health), flush=True)
    elif child.poll() is None:
        print(f"troupe: {url}/health did not answer within {args.ready_timeout:.0f}s; "
              "still waiting on serve run", file=sys.stderr, flush=True)
    try:
        return child.wait()
    finally:
        _stop(conversions)
        shutil.rmtree(haproxy_folder, ignore_errors=True)


def cmd_validate(args: argparse.Namespace) -> int:
    try:
        apps = validate(Path(args.config))
    except ConfigError as exc:
        print(f"troupe: {exc}", file=sys.stderr)
        return 2
    for settings in apps:
        for model in settings.models:
            print(f"ok: model {model.id} ({model.modality}, engine {model.engine.type})")
        print(f"ok: reserves {settings.cpus_at_start()} Ray CPUs at start")
    problem = local_cpu_problem(apps)
    if problem is not None:
        print(f"warning: on this machine, {problem}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Per deployment: replicas by state, nodes, GPUs, in-flight requests, scaling targets."""
    import ray

    from serve_app.cli.status import (
        collect_status,
        engine_queues_from_metrics,
        format_status,
        in_flight_from_metrics,
    )

    settings: dict[str, TroupeSettings] = {}
    url = args.url
    if args.config:
        try:
            config = read_serve_config(Path(args.config))
        except ConfigError as exc:
            print(f"troupe: {exc}", file=sys.stderr)
            return 2
        settings = config.apps
        url = url or f"http://{config.host}:{config.port}"
    try:
        ray.init(address=args.address, logging_level=logging.ERROR, log_to_driver=False)
    except ConnectionError as exc:
        print(f"troupe: no Ray cluster at {args.address!r} ({exc}). Start the gateway first "
              "(make run), or pass --address of a running cluster.", file=sys.stderr)
        return 2
    try:
        rows = collect_status(settings, in_flight_from_metrics(url) if url else None,
                              engine_queues_from_metrics(url) if url else None)
    finally:
        ray.shutdown()
    print(json.dumps(rows, indent=2) if args.json else format_status(rows))
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    """Convert the bundled SmolLM2 GGUF to safetensors once, so later starts load in ~1 s."""
    from deployments.engines import gguf_cache

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.monotonic()
    path = gguf_cache.prepare_bundled_model(args.cache_dir)
    print(f"{path} ready ({time.monotonic() - started:.1f} s)")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="troupe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve a config and print the URL when ready")
    run.add_argument("config", nargs="?", default="config/local.yaml")
    run.add_argument("--ready-timeout", type=float, default=900.0)
    run.set_defaults(func=cmd_run)
    st = sub.add_parser("status", help="replicas, nodes, GPUs, in-flight and scaling per deployment")
    st.add_argument("config", nargs="?", help="the Serve config (adds resources and targets)")
    st.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    st.add_argument("--url", default=None, help="gateway URL for in-flight counts")
    st.add_argument("--json", action="store_true", help="print JSON")
    st.set_defaults(func=cmd_status)
    val = sub.add_parser("validate", help="check a Serve config's Troupe settings")
    val.add_argument("config")
    val.set_defaults(func=cmd_validate)
    prep = sub.add_parser("prepare", help="convert the bundled GGUF model once (make models)")
    prep.add_argument("--cache-dir", default=None, help="cache root (default ~/.cache/troupe/models)")
    prep.set_defaults(func=cmd_prepare)
    add_keys_parser(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

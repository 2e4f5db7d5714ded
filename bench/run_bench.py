"""Troupe vs bare Ray Serve, side by side in one Ray/Serve instance, rounds interleaved.

Both applications run at once on the same Serve proxy: the bare baseline
(``bench.baseline_app``, under ``/baseline``) and Troupe (``serve_app.build.app.build_app``,
under ``/``), each as proxy -> ingress -> handle -> model deployment on the same mock engine
and the same replica resources. Every scenario runs ``rounds`` times per side, the order
alternating (B T, T B, B T, ...), so slow drift on a shared machine hits both sides alike.

Run from the repository root::

    .venv/bin/python -m bench.run_bench                 # full run (~6 min)
    .venv/bin/python -m bench.run_bench --quick         # smoke run (~1 min)
    .venv/bin/python -m bench.run_bench --only-baseline --quick
    .venv/bin/python -m bench.run_bench --throughput-optimized

Results: ``bench/results/<timestamp>.json`` and ``.md``, plus ``bench/results/latest.md``.
Ray and Serve are imported only after the environment is set (Serve reads
``RAY_SERVE_THROUGHPUT_OPTIMIZED`` at import time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from bench.loadgen import LoadSpec, run_load, summarize
from bench.report import (  # re-exported: the other benches import them from here
    RESULTS_DIR,
    aggregate,
    collect_env,
    fmt,
    markdown,
    write_results,
)

MODEL_ID = "mock-5ms"
SIDES = ("baseline", "troupe")

TROUPE_ARGS: dict[str, Any] = {
    "models": [{
        "id": MODEL_ID,
        "engine": {"type": "mock", "token_delay_ms": 5, "ignore_eos": True},
        "deployment": {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.5}},
    }],
    "gateway": {"ray_actor_options": {"num_cpus": 0.5}},
}


# --------------------------------------------------------------------------- scenarios


@dataclass(frozen=True)
class Measure:
    """One reported number: ``summary[key][stat]`` (or ``summary[key]`` when stat is None)."""

    label: str
    key: str
    stat: Optional[str]
    unit: str
    higher_is_better: bool = False

    def read(self, summary: dict[str, Any]) -> Optional[float]:
        value = summary.get(self.key)
        if self.stat is not None:
            value = value.get(self.stat) if value else None
        return value


@dataclass(frozen=True)
class Scenario:
    key: str
    title: str
    stream: bool
    concurrency: int
    max_tokens: int
    max_requests: int
    duration_s: float
    measures: tuple[Measure, ...]


_E2E_P50 = Measure("e2e p50", "e2e_ms", "p50", "ms")
_E2E_P99 = Measure("e2e p99", "e2e_ms", "p99", "ms")
_TTFT_P50 = Measure("TTFT p50", "ttft_ms", "p50", "ms")
_TTFT_P90 = Measure("TTFT p90", "ttft_ms", "p90", "ms")
_TPOT_P50 = Measure("time/token p50", "tpot_ms", "p50", "ms")
_ITL_P99 = Measure("inter-token p99", "itl_ms", "p99", "ms")
_RPS = Measure("throughput", "throughput_rps", None, "req/s", higher_is_better=True)

SCENARIOS: tuple[Scenario, ...] = (
    Scenario("a", "unary c=1, max_tokens=1", False, 1, 1, 600, 6.0, (_E2E_P50, _E2E_P99)),
    Scenario("b", "stream c=1, max_tokens=64", True, 1, 64, 25, 10.0,
             (_TPOT_P50, _TTFT_P50, _E2E_P50)),
    Scenario("c", "stream c=16, max_tokens=64", True, 16, 64, 160, 12.0,
             (_TTFT_P50, _TTFT_P90, _TPOT_P50, _ITL_P99)),
    Scenario("d", "unary c=32, max_tokens=16", False, 32, 16, 4000, 8.0, (_RPS, _E2E_P50)),
)

# --quick: the same scenarios, shorter.
QUICK_BOUNDS: dict[str, tuple[int, float]] = {
    "a": (200, 1.5), "b": (4, 3.0), "c": (32, 4.0), "d": (1000, 2.5),
}


def select_scenarios(quick: bool, only: Optional[str]) -> list[Scenario]:
    chosen = [s for s in SCENARIOS if not only or s.key in only]
    if quick:
        chosen = [replace(s, max_requests=QUICK_BOUNDS[s.key][0], duration_s=QUICK_BOUNDS[s.key][1])
                  for s in chosen]
    return chosen


# --------------------------------------------------------------------------- ray / serve


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_environment(throughput_optimized: bool) -> dict[str, str]:
    """Set env before Ray starts: it is inherited by the raylet and every replica.

    Returns the Serve variables chosen here (recorded with the results).
    """
    if throughput_optimized:
        os.environ["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    # Direct ingress (on with RAY_SERVE_THROUGHPUT_OPTIMIZED=1) binds replica ports from
    # 30000-31000 / 40000-41000 by default; another local cluster would collide there.
    http_base = random.randrange(20000, 29800, 100)
    grpc_base = random.randrange(10000, 19800, 100)
    chosen = {
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(http_base),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(http_base + 100),
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc_base),
        "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc_base + 100),
    }
    # Ingress replicas with direct ingress drain >= 30 s on shutdown (for external load
    # balancers); nothing here needs that, and it would add 30 s to every --throughput-
    # optimized run. Steady-state request handling does not read it.
    chosen["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
    for key, value in chosen.items():
        os.environ.setdefault(key, value)
    return {k: os.environ[k] for k in chosen}


def start_ray(num_cpus: float) -> None:
    """``ray.init`` a private local cluster whose dashboard agent takes a free port.

    ``ray.init`` has no argument for the agent's port and defaults to 52365, which a
    second local cluster cannot bind; 0 asks the agent to pick a free one.
    """
    import ray
    import ray._private.parameter as parameter

    original = parameter.RayParams

    class _RayParams(original):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("dashboard_agent_listen_port", 0)
            super().__init__(*args, **kwargs)

    parameter.RayParams = _RayParams
    try:
        ray.init(address="local", include_dashboard=False, num_cpus=num_cpus,
                 log_to_driver=False)
    finally:
        parameter.RayParams = original


class Cluster:
    """Owns the Ray/Serve lifetime: ``close()`` is idempotent and also runs on signals."""

    def __init__(self) -> None:
        self.closing = False

    def install_signal_handlers(self) -> None:
        def on_signal(signum: int, _frame: Any) -> None:
            if self.closing:
                print(f"\nsignal {signum}: already shutting down", file=sys.stderr)
                return
            print(f"\nsignal {signum}: stopping the benchmark, shutting down Serve and Ray",
                  file=sys.stderr)
            # Unwind to main()'s finally, which calls close() outside the handler.
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def close(self) -> None:
        if self.closing:
            return
        self.closing = True
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


def troupe_args(observability: bool) -> dict[str, Any]:
    """Troupe's benchmark config, with metrics + tracing on or off (ledger in a temp dir)."""
    state = Path(tempfile.mkdtemp(prefix="troupe-bench-"))
    return {
        **TROUPE_ARGS,
        "metrics": {"enabled": observability,
                    "store_url": "sqlite:///" + str(state / "ledger.db").lstrip("/")},
        "tracing": {"enabled": observability},
    }


def deploy_apps(include_troupe: bool, port: int, timeout_s: float, on_vs_off: bool = False) -> None:
    """Start Serve on ``port`` and deploy both applications; raise if one fails.

    ``on_vs_off``: the "baseline" side is Troupe itself with metrics and tracing off, so
    the ratios read observability on / off.
    """
    from ray import serve

    from bench.baseline_app import BASELINE_APP_NAME, BASELINE_ROUTE_PREFIX, build_baseline_app
    from serve_app.build.app import build_app

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    baseline = build_app(troupe_args(False)) if on_vs_off else build_baseline_app()
    targets = [serve.RunTarget(baseline, name=BASELINE_APP_NAME,
                               route_prefix=BASELINE_ROUTE_PREFIX)]
    if include_troupe:
        targets.append(serve.RunTarget(build_app(troupe_args(True)), name="troupe", route_prefix="/"))
    serve.run_many(targets, wait_for_ingress_deployment_creation=False,
                   wait_for_applications_running=False)
    wait_running([t.name for t in targets], timeout_s)


def wait_running(names: list[str], timeout_s: float) -> None:
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {n: (apps[n].status if n in apps else "MISSING") for n in names}
        failed = [n for n, s in states.items() if s in ("DEPLOY_FAILED", "UNHEALTHY")]
        if failed:
            msgs = "\n".join(f"--- {n}: {apps[n].status}\n{apps[n].message}" for n in failed)
            raise RuntimeError(f"application(s) failed to deploy:\n{msgs}")
        if all(s == "RUNNING" for s in states.values()):
            return
        if time.monotonic() > deadline:
            detail = {n: (apps[n].message if n in apps else "") for n in names}
            raise RuntimeError(f"applications not RUNNING after {timeout_s:.0f}s: {states} {detail}")
        time.sleep(0.5)


# --------------------------------------------------------------------------- running


def side_urls(port: int) -> dict[str, str]:
    return {
        "baseline": f"http://127.0.0.1:{port}/baseline/v1/chat/completions",
        "troupe": f"http://127.0.0.1:{port}/v1/chat/completions",
    }


def wait_http_ready(url: str, headers: dict[str, str], timeout_s: float) -> None:
    """Until the proxy routes a real request (route tables arrive by long poll)."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        spec = LoadSpec(url, MODEL_ID, stream=False, max_requests=1, duration_s=5,
                        max_tokens=1, headers=headers, request_timeout_s=10)
        results, _ = asyncio.run(run_load(spec))
        if results and results[0].ok:
            return
        last = results[0].error if results else "no result"
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer 200 within {timeout_s:.0f}s: {last}")


def run_one(url: str, headers: dict[str, str], sc: Scenario) -> dict[str, Any]:
    spec = LoadSpec(url, MODEL_ID, stream=sc.stream, concurrency=sc.concurrency,
                    max_requests=sc.max_requests, duration_s=sc.duration_s,
                    max_tokens=sc.max_tokens, headers=headers)
    results, wall = asyncio.run(run_load(spec))
    return summarize(results, wall)


def warm_up(urls: dict[str, str], headers: dict[str, dict[str, str]], quick: bool) -> None:
    """Exercise both modes at the highest concurrency once per side (results dropped)."""
    warm = (
        Scenario("w1", "warm stream", True, 16, 16, 32 if quick else 64, 5.0, ()),
        Scenario("w2", "warm unary", False, 32, 4, 200 if quick else 600, 1.5 if quick else 3.0, ()),
    )
    for side, url in urls.items():
        for sc in warm:
            s = run_one(url, headers[side], sc)
            print(f"  warm-up {side:8s} {sc.title:12s} {s['ok']} ok, {s['errors']} errors")


def run_scenarios(urls: dict[str, str], headers: dict[str, dict[str, str]],
                  scenarios: list[Scenario], rounds: int, settle_s: float) -> dict[str, Any]:
    """Scenario by scenario, ``rounds`` runs per side, alternating which side goes first."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for sc in scenarios:
        runs[sc.key] = {side: [] for side in urls}
        for r in range(rounds):
            order = list(urls) if r % 2 == 0 else list(reversed(urls))
            for side in order:
                summary = run_one(urls[side], headers[side], sc)
                summary["round"] = r
                runs[sc.key][side].append(summary)
                shown = "  ".join(f"{m.label} {fmt(m.read(summary))}" for m in sc.measures)
                print(f"  ({sc.key}) {sc.title:28s} round {r + 1}/{rounds} {side:8s} "
                      f"{shown}  [{summary['ok']} ok, {summary['errors']} err]", flush=True)
                time.sleep(settle_s)
    return runs


# --------------------------------------------------------------------------- main


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.run_bench",
                                description="Troupe vs bare Ray Serve, interleaved rounds.")
    p.add_argument("--quick", action="store_true", help="short smoke run (~1 minute)")
    p.add_argument("--only-baseline", action="store_true", help="skip the Troupe side")
    p.add_argument("--throughput-optimized", action="store_true",
                   help="set RAY_SERVE_THROUGHPUT_OPTIMIZED=1 before Ray starts")
    p.add_argument("--rounds", type=int, default=None, help="rounds per side (3; quick: 2)")
    p.add_argument("--scenarios", default=None, help="subset of scenario keys, e.g. 'ab'")
    p.add_argument("--num-cpus", type=float, default=2, help="Ray's logical CPUs")
    p.add_argument("--port", type=int, default=None, help="Serve HTTP port (default: free)")
    p.add_argument("--api-key", default=None, help="Bearer key for Troupe, if auth is on")
    p.add_argument("--deploy-timeout", type=float, default=180.0)
    p.add_argument("--no-write", action="store_true", help="print only, write no files")
    p.add_argument("--on-vs-off", action="store_true",
                   help="compare Troupe with metrics+tracing on against Troupe with them off")
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 2 if args.quick else 3
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    return args


def benchmark(args: argparse.Namespace, env: dict[str, Any]) -> dict[str, Any]:
    """Deploy, warm up and measure (Ray is already up)."""
    port = args.port or _free_port()
    started = time.monotonic()
    deploy_apps(not args.only_baseline, port, args.deploy_timeout, args.on_vs_off)
    urls = side_urls(port)
    if args.only_baseline:
        del urls["troupe"]
    headers = {"baseline": {},
               "troupe": {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}}
    for side, url in urls.items():
        wait_http_ready(url, headers[side], 60)
    print(f"deployed in {time.monotonic() - started:.1f}s; Serve on 127.0.0.1:{port}")
    warm_up(urls, headers, args.quick)
    scenarios = select_scenarios(args.quick, args.scenarios)
    runs = run_scenarios(urls, headers, scenarios, args.rounds, 0.5 if args.quick else 1.0)
    env["loadavg_end"] = list(os.getloadavg())
    return {"scenarios": [asdict(s) for s in scenarios], "runs": runs,
            "rows": aggregate(scenarios, runs), "serve_port": port}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    serve_env = prepare_environment(args.throughput_optimized)
    started_at = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    t0 = time.monotonic()
    cluster = Cluster()
    try:
        start_ray(args.num_cpus)
        cluster.install_signal_handlers()
        env = collect_env(args.num_cpus, serve_env)
        print(f"Ray up; RAY_SERVE_THROUGHPUT_OPTIMIZED={env['RAY_SERVE_THROUGHPUT_OPTIMIZED']}")
        try:
            result = benchmark(args, env)
        except Exception:  # a failed deploy: show why, still shut down cleanly
            traceback.print_exc()
            print("benchmark aborted (see the traceback above)", file=sys.stderr)
            return 2
    finally:
        cluster.close()
    meta = {"started_at": started_at, "quick": args.quick, "rounds": args.rounds,
            "on_vs_off": args.on_vs_off,
            "only_baseline": args.only_baseline, "total_s": time.monotonic() - t0,
            "troupe_args": None if args.only_baseline else TROUPE_ARGS}
    report = {"meta": meta, "env": env, **result}
    md = markdown(result["rows"], env, meta)
    print()
    print(md)
    if not args.no_write:
        tag = started_at + ("-quick" if args.quick else "") + (
            "-tpo" if args.throughput_optimized else "") + ("-baseline" if args.only_baseline else "") + (
            "-obs-on-vs-off" if args.on_vs_off else "")
        stem = write_results(report, md, tag)
        print(f"wrote {stem}.json, {stem}.md and {RESULTS_DIR / 'latest.md'}")
    print(f"total {meta['total_s']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

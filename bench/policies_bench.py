"""Policies on vs off: Troupe with auth + rate limits + idempotency keys against Troupe
without them, both deployed at once on one Serve proxy, rounds interleaved.

* ``on`` (``/on``): a state store holding an API key (so auth is on; every request sends
  it), default rate limits (requests/min and tokens/min, high enough never to refuse:
  the cost of leasing and counting is what is measured), and a fresh ``Idempotency-Key``
  on every request (a claim and a stored response in SQLite per request).
* ``off`` (``/off``): an empty store on loopback (auth off), no limits, no header.

Same model config, same mock engine, same replica resources. Closed loop, unary chat,
c=32, max_tokens=16 (the throughput scenario of bench/run_bench.py). Run::

    .venv/bin/python -m bench.policies_bench            # 5 rounds x 8 s per side
    .venv/bin/python -m bench.policies_bench --quick    # 2 rounds x 3 s

Results: ``bench/results/<timestamp>-policies-on-vs-off.{json,md}``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import aiohttp

from bench.run_bench import (
    RESULTS_DIR,
    TROUPE_ARGS,
    Cluster,
    _free_port,
    collect_env,
    prepare_environment,
    start_ray,
    wait_running,
)

SIDES = ("off", "on")
_counter = itertools.count()


def side_args(on: bool, state: Path) -> dict[str, Any]:
    # Two apps on a 2-CPU Ray: 0.4 CPU per replica leaves room for the actors.
    model = {**TROUPE_ARGS["models"][0],
             "deployment": {"max_ongoing_requests": 64, "ray_actor_options": {"num_cpus": 0.4}}}
    args: dict[str, Any] = {
        **TROUPE_ARGS,
        "models": [model],
        "gateway": {"ray_actor_options": {"num_cpus": 0.4}},
        "metrics": {"store_url": "sqlite:///" + str(state / f"{'on' if on else 'off'}.db").lstrip("/")},
    }
    if on:
        args["limits"] = {"default": {"requests_per_minute": 1_000_000,
                                      "tokens_per_minute": 100_000_000}}
    return args


async def make_key(state: Path) -> str:
    from serve_app.policies.keys import mint_key
    from serve_app.store.sqlite import SQLiteStore

    store = SQLiteStore(state / "on.db")
    await store.open()
    token, row = mint_key("bench", "workspace")
    await store.key_create(row)
    await store.close()
    return token


async def run_load(url: str, headers: dict[str, str], idempotent: bool, concurrency: int,
                   duration_s: float, max_tokens: int) -> dict[str, Any]:
    body = json.dumps({"model": "mock-5ms", "max_tokens": max_tokens,
                       "messages": [{"role": "user", "content": "Hello there"}]})
    ok = errors = 0
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, headers={
            "content-type": "application/json", **headers}) as session:
        start = time.perf_counter()
        deadline = start + duration_s

        async def worker() -> None:
            nonlocal ok, errors
            while time.perf_counter() < deadline:
                extra = {"idempotency-key": f"bench-{os.getpid()}-{next(_counter)}"} if idempotent else {}
                t0 = time.perf_counter()
                async with session.post(url, data=body, headers=extra) as resp:
                    await resp.read()
                    statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    if resp.status == 200:
                        ok += 1
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    latencies.sort()
    return {"ok": ok, "errors": errors, "statuses": statuses, "wall_s": wall,
            "throughput_rps": ok / wall,
            "p50_ms": latencies[len(latencies) // 2] * 1000 if latencies else None}


def wait_ready(url: str, headers: dict[str, str], timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    body = {"model": "mock-5ms", "max_tokens": 1, "messages": [{"role": "user", "content": "x"}]}
    last: Any = None
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url, json=body, headers=headers, timeout=10)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready: {last}")


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.policies_bench")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--num-cpus", type=float, default=2)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    duration = args.duration or (3.0 if args.quick else 8.0)
    prepare_environment(False)
    started_at = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    state = Path(tempfile.mkdtemp(prefix="troupe-policies-bench-"))
    key = asyncio.run(make_key(state))
    cluster = Cluster()
    runs: dict[str, list[dict[str, Any]]] = {s: [] for s in SIDES}
    try:
        start_ray(args.num_cpus)
        cluster.install_signal_handlers()
        env = collect_env(args.num_cpus, {})
        from ray import serve

        from serve_app.build.app import build_app

        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many([
            serve.RunTarget(build_app(side_args(False, state)), name="off", route_prefix="/off"),
            serve.RunTarget(build_app(side_args(True, state)), name="on", route_prefix="/on"),
        ], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
        wait_running(["off", "on"], 180)
        urls = {s: f"http://127.0.0.1:{port}/{s}/v1/chat/completions" for s in SIDES}
        headers = {"off": {}, "on": {"authorization": f"Bearer {key}"}}
        for side in SIDES:
            wait_ready(urls[side], headers[side], 60)
            warm = asyncio.run(run_load(urls[side], headers[side], side == "on",
                                        args.concurrency, 2.0, 16))
            print(f"warm-up {side}: {warm['throughput_rps']:.1f} req/s {warm['statuses']}")
        for r in range(rounds):
            order = SIDES if r % 2 == 0 else tuple(reversed(SIDES))
            for side in order:
                res = asyncio.run(run_load(urls[side], headers[side], side == "on",
                                           args.concurrency, duration, 16))
                res["round"] = r
                runs[side].append(res)
                print(f"round {r + 1}/{rounds} {side:3s}: {res['throughput_rps']:.1f} req/s, "
                      f"p50 {res['p50_ms']:.1f} ms, statuses {res['statuses']}", flush=True)
                time.sleep(1.0)
        env["loadavg_end"] = list(os.getloadavg())
    finally:
        cluster.close()
    med = {s: statistics.median(r["throughput_rps"] for r in runs[s]) for s in SIDES}
    p50 = {s: statistics.median(r["p50_ms"] for r in runs[s]) for s in SIDES}
    paired = statistics.median(on["throughput_rps"] / off["throughput_rps"]
                               for on, off in zip(runs["on"], runs["off"]))
    ratio = med["on"] / med["off"]
    errors = {s: sum(r["errors"] for r in runs[s]) for s in SIDES}
    md = "\n".join([
        f"# Troupe policies on vs off — {started_at}",
        "",
        f"rounds: {rounds} x {duration:.0f} s per side, interleaved; unary chat c={args.concurrency}, "
        f"max_tokens=16, mock 5 ms/token; cpus {env['cpu_count']}, ray {env['ray_version']}, "
        f"load avg {env['loadavg_start'][0]:.2f} -> {env['loadavg_end'][0]:.2f}",
        "",
        "'on' = API key auth + rate limits (rpm + tpm, leased from the quota actor) + a fresh "
        "Idempotency-Key per request (SQLite claim + stored response); 'off' = none of them.",
        "",
        "| measure | off | on | on/off | paired | errors off/on |",
        "|---|---:|---:|---:|---:|---:|",
        f"| throughput (req/s) ↑ | {med['off']:.1f} | {med['on']:.1f} | ×{ratio:.2f} | "
        f"×{paired:.2f} | {errors['off']}/{errors['on']} |",
        f"| e2e p50 (ms) | {p50['off']:.1f} | {p50['on']:.1f} | ×{p50['on'] / p50['off']:.2f} | — | |",
        "",
    ])
    print(md)
    if not args.no_write:
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        stem = RESULTS_DIR / (started_at + ("-quick" if args.quick else "") + "-policies-on-vs-off")
        stem.with_suffix(".json").write_text(json.dumps(
            {"runs": runs, "median_rps": med, "ratio": ratio, "paired_ratio": paired,
             "env": env}, indent=2, default=str))
        stem.with_suffix(".md").write_text(md)
        print(f"wrote {stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())

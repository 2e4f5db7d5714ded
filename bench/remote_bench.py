"""Latency Troupe's remote path adds over calling the upstream directly, next to LiteLLM's.

One run, same fake OpenAI upstream (tests/fake_openai.py, in its own process, answering
at once) behind four targets, each measured with the same closed-loop load generator
(bench/loadgen.py, non-streaming chat completions) at c=1 and c=32:

* ``direct``: the client calls the fake upstream itself (the floor);
* ``troupe-gw``: Troupe with the remote engine inside the gateway replica
  (``run_in: gateway``): proxy → gateway → upstream;
* ``troupe-dep``: Troupe with the remote engine in its own model deployment
  (``run_in: deployment``): proxy → gateway → handle → model replica → upstream;
* ``litellm``: LiteLLM's proxy (one worker) in front of the same upstream.

"Added" is a target's p50/p99 minus the direct path's at the same concurrency.

Two scenarios, interleaved per concurrency: ``plain`` (a text turn) and ``tools`` (the
same request with one function tool and a prompt that makes the fake answer a tool call,
tests/fake_agent.py), so the tool translation in both directions is on the measured path.

LiteLLM is never a Troupe dependency: it lives in its own virtual environment, made by
``make bench-remote`` (``/tmp/litellm-venv``, override with ``--litellm-venv``); without
it the LiteLLM rows are skipped and the report says so.

Run (takes 3-4 minutes; starts a private local Ray)::

    make bench-remote
    # or: .venv/bin/python -m bench.remote_bench [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import httpx

from bench.loadgen import DEFAULT_PROMPT, LoadSpec, run_load, summarize

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"
UPSTREAM_KEY = "sk-bench-remote-0123456789"
UPSTREAM_MODEL = "gpt-4o-mini"
REPLY_TOKENS = 16
_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
#: scenario -> (prompt, extra request fields); the tools prompt makes the fake call the tool.
SCENARIOS: dict[str, tuple[str, dict[str, Any]]] = {
    "plain": (DEFAULT_PROMPT, {}),
    "tools": ("What is the weather in Paris? Use the tool.", {"tools": [_WEATHER]}),
}
#: LiteLLM's proxy refuses to start without one (checked by a string compare per request).
LITELLM_MASTER_KEY = "sk-litellm-bench-0123456789abcdef"


# --------------------------------------------------------------------------- processes


def _serve_fake() -> None:
    """Child process: the fake upstream, answering at once, until killed."""
    from tests.fake_openai import FakeOpenAI

    fake = FakeOpenAI(expected_api_key=UPSTREAM_KEY, reply_tokens=REPLY_TOKENS)

    async def run() -> None:
        await fake.astart()
        fake.requests = _Discard()  # type: ignore[assignment]  # no per-request memory
        print(f"PORT {fake.port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(run())


class _Discard(list):
    def append(self, item: Any) -> None:  # noqa: D401 - a list that keeps nothing
        return None


def start_fake() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.remote_bench", "--serve-fake"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        raise RuntimeError(f"fake upstream did not start: {line!r}")
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_litellm(venv: Path, upstream: str) -> Optional[tuple[subprocess.Popen, str, str]]:
    exe = venv / "bin" / "litellm"
    if not exe.exists():
        return None
    cfg = Path(tempfile.mkdtemp(prefix="litellm-bench-")) / "config.yaml"
    cfg.write_text(
        "model_list:\n"
        "  - model_name: bench-remote\n"
        "    litellm_params:\n"
        f"      model: openai/{UPSTREAM_MODEL}\n"
        f"      api_base: {upstream}\n"
        f"      api_key: {UPSTREAM_KEY}\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
        "general_settings:\n"
        f"  master_key: {LITELLM_MASTER_KEY}\n"
    )
    port = _free_port()
    log = open(cfg.parent / "litellm.log", "w")
    proc = subprocess.Popen(
        [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port),
         "--num_workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
             "DISABLE_SCHEMA_UPDATE": "True"},
        start_new_session=True,
    )
    return proc, f"http://127.0.0.1:{port}", str(cfg.parent / "litellm.log")


def wait_ready(url: str, body: dict[str, Any], headers: dict[str, str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.post(url, json=body, headers=headers, timeout=10)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready in {timeout_s}s: {last}")


def deploy_troupe(upstream: str, state_dir: str, throughput_optimized: bool = False) -> int:
    """Private local Ray + Serve with the two Troupe variants; returns the HTTP port."""
    from ray import serve

    from bench.run_bench import prepare_environment, start_ray
    from serve_app.build.app import build_app

    prepare_environment(throughput_optimized)
    os.environ["TROUPE_BENCH_REMOTE_KEY"] = UPSTREAM_KEY
    start_ray(4)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    engine = {"type": "openai", "base_url": upstream, "model": UPSTREAM_MODEL,
              "api_key_env": "TROUPE_BENCH_REMOTE_KEY"}
    deployment = {"max_ongoing_requests": 256, "ray_actor_options": {"num_cpus": 0.5}}
    args = {
        "models": [
            {"id": "troupe-gw", "engine": engine, "deployment": deployment, "run_in": "gateway"},
            {"id": "troupe-dep", "engine": engine, "deployment": deployment},
        ],
        "gateway": {"max_ongoing_requests": 512, "ray_actor_options": {"num_cpus": 1}},
        "metrics": {"store_url": f"sqlite:///{state_dir.lstrip('/')}/ledger.db"},
        "session": {"store_url": f"sqlite:///{state_dir.lstrip('/')}/session.db"},
    }
    serve.run(build_app(args), name="troupe", route_prefix="/")
    return port


# --------------------------------------------------------------------------- measuring


def measure(url: str, model: str, headers: dict[str, str], concurrency: int,
            requests: int, duration_s: float, scenario: str = "plain") -> dict[str, Any]:
    prompt, extra = SCENARIOS[scenario]
    spec = LoadSpec(url=url, model=model, stream=False, concurrency=concurrency,
                    max_requests=requests, duration_s=duration_s, max_tokens=64,
                    headers=headers, request_timeout_s=30, prompt=prompt, extra_body=extra)
    results, wall = asyncio.run(run_load(spec))
    return summarize(results, wall)


def run(args: argparse.Namespace) -> dict[str, Any]:
    fake_proc, upstream = start_fake()
    procs: list[subprocess.Popen] = [fake_proc]
    notes: list[str] = []
    try:
        body = {"model": UPSTREAM_MODEL, "messages": [{"role": "user", "content": "hi"}]}
        targets: dict[str, tuple[str, str, dict[str, str]]] = {
            "direct": (upstream + "/chat/completions", UPSTREAM_MODEL,
                       {"Authorization": f"Bearer {UPSTREAM_KEY}"}),
        }
        lite = start_litellm(Path(args.litellm_venv), upstream)
        if lite is None:
            notes.append(f"LiteLLM skipped: no {args.litellm_venv}/bin/litellm "
                         "(make bench-remote creates it)")
        else:
            procs.append(lite[0])
            targets["litellm"] = (lite[1] + "/v1/chat/completions", "bench-remote",
                                  {"Authorization": f"Bearer {LITELLM_MASTER_KEY}"})
        state = tempfile.mkdtemp(prefix="troupe-bench-remote-")
        port = deploy_troupe(upstream, state, args.throughput_optimized)
        base = f"http://127.0.0.1:{port}/v1/chat/completions"
        targets["troupe-gw"] = (base, "troupe-gw", {})
        targets["troupe-dep"] = (base, "troupe-dep", {})
        scenarios = args.scenarios.split(",")
        for url, model, headers in targets.values():
            wait_ready(url, {**body, "model": model}, headers, 120)
            for scenario in scenarios:  # warm-up
                measure(url, model, headers, 4, 40 if args.quick else 200, 10, scenario)
        order = ["direct", "troupe-gw", "troupe-dep", "litellm"]
        rows: dict[str, dict[str, Any]] = {}
        for conc in (1, 32):
            for scenario in scenarios:
                for name in order:
                    if name not in targets:
                        continue
                    url, model, headers = targets[name]
                    n = (100 if args.quick else 400) if conc == 1 else 100_000
                    dur = 6 if args.quick else 15
                    key = _key(scenario, name, conc)
                    rows[key] = measure(url, model, headers, conc, n, dur, scenario)
                    s = rows[key]
                    print(f"{scenario:6s} {name:11s} c={conc:<3d} p50 {s['e2e_ms']['p50']:7.2f} ms"
                          f"  p99 {s['e2e_ms']['p99']:7.2f} ms  {s['throughput_rps']:7.1f} req/s"
                          f"  errors {s['errors']}", flush=True)
        return {"rows": rows, "notes": notes, "scenarios": scenarios}
    finally:
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM) if proc is not fake_proc else proc.kill()
            except (ProcessLookupError, PermissionError):
                pass
        try:
            import ray
            from ray import serve

            if ray.is_initialized():
                serve.shutdown()
                ray.shutdown()
        except Exception:
            pass


def _key(scenario: str, name: str, conc: int) -> str:
    """A row's key: the plain scenario keeps the older results' ``name@cN`` keys."""
    return f"{name}@c{conc}" if scenario == "plain" else f"{scenario}/{name}@c{conc}"


def report(result: dict[str, Any]) -> str:
    lines = [
        "# Remote path: added latency over the upstream, Troupe vs LiteLLM",
        "",
        f"Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; host "
        f"{platform.node()} ({os.cpu_count()} CPUs, shared); fake OpenAI upstream answering "
        f"{REPLY_TOKENS} tokens at once; non-streaming chat completions; closed loop; "
        f"RAY_SERVE_THROUGHPUT_OPTIMIZED={'1' if result.get('throughput_optimized') else 'unset'}.",
    ]
    for scenario in result.get("scenarios", ["plain"]):
        rows = {f"{name}@c{conc}": result["rows"][_key(scenario, name, conc)]
                for conc in (1, 32) for name in ("direct", "troupe-gw", "troupe-dep", "litellm")
                if _key(scenario, name, conc) in result["rows"]}
        lines += ["", f"## Scenario: {scenario} ({SCENARIOS[scenario][0]!r}"
                  f"{', with tools' if SCENARIOS[scenario][1] else ''})", ""]
        lines += _table(rows)
    for note in result["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def _table(rows: dict[str, Any]) -> list[str]:
    """One scenario's table and its Troupe-vs-LiteLLM lines."""
    lines = [
        "| target | c | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s | errors |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for conc in (1, 32):
        direct = rows.get(f"direct@c{conc}")
        for name in ("direct", "troupe-gw", "troupe-dep", "litellm"):
            s = rows.get(f"{name}@c{conc}")
            if s is None or s["e2e_ms"] is None:
                continue
            add50 = s["e2e_ms"]["p50"] - direct["e2e_ms"]["p50"] if direct else float("nan")
            add99 = s["e2e_ms"]["p99"] - direct["e2e_ms"]["p99"] if direct else float("nan")
            lines.append(
                f"| {name} | {conc} | {s['e2e_ms']['p50']:.2f} | {s['e2e_ms']['p99']:.2f} | "
                f"{add50:.2f} | {add99:.2f} | {s['throughput_rps']:.1f} | {s['errors']} |")
    lines.append("")
    for conc in (1, 32):
        t, lt, d = (rows.get(f"{n}@c{conc}") for n in ("troupe-gw", "litellm", "direct"))
        if t and lt and d:
            ta = t["e2e_ms"]["p50"] - d["e2e_ms"]["p50"]
            la = lt["e2e_ms"]["p50"] - d["e2e_ms"]["p50"]
            lines.append(
                f"- c={conc}: Troupe (in-gateway engine) adds {ta:.2f} ms p50 vs LiteLLM "
                f"{la:.2f} ms (ratio {ta / la:.2f}); throughput "
                f"{t['throughput_rps']:.0f} vs {lt['throughput_rps']:.0f} req/s "
                f"(ratio {t['throughput_rps'] / lt['throughput_rps']:.2f}).")
    return lines


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Short runs (a smoke test).")
    parser.add_argument("--litellm-venv", default=os.environ.get("LITELLM_VENV",
                                                                "/tmp/litellm-venv"))
    parser.add_argument("--throughput-optimized", action="store_true",
                        help="Run Serve with RAY_SERVE_THROUGHPUT_OPTIMIZED=1.")
    parser.add_argument("--scenarios", default="plain,tools",
                        help="Comma-separated scenarios: plain (text), tools (a tool call).")
    parser.add_argument("--serve-fake", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_fake:
        _serve_fake()
        return 0
    result = run(args)
    result["throughput_optimized"] = args.throughput_optimized
    md = report(result)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    tag = "-remote-tpo" if args.throughput_optimized else "-remote"
    if "tools" in args.scenarios.split(","):
        tag += "-tools"
    result["throughput_optimized"] = args.throughput_optimized
    (RESULTS / f"{stamp}{tag}.json").write_text(json.dumps(result, indent=2))
    (RESULTS / f"{stamp}{tag}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

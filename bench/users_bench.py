"""Troupe as users run it: each system alone, in its own Ray instance, rounds interleaved.

``bench.run_bench`` deploys Troupe and the bare app into one Serve instance, which is right
for attributing per-request cost but hides what a running Troupe costs the machine (its
actors, its background loops, its proxy). Here every system starts the way a user starts it
and runs alone:

* ``troupe``: ``troupe run`` of a one-model config (mock engine, 5 ms per token), with
  whatever environment ``troupe run`` sets by default (Serve's HAProxy ingress included);
* ``serve``: ``serve run`` of the bare Ray Serve app of ``bench.baseline_app``
  (proxy -> FastAPI ingress -> handle -> mock deployment), Ray's defaults;
* ``uvicorn``: plain uvicorn + FastAPI with the same mock engine in process (the floor);
* ``litellm``: LiteLLM's proxy (one worker) in front of an OpenAI-compatible upstream on
  the same mock (only when ``make bench-remote``'s LiteLLM venv exists).

Variants for attribution (``--systems``): ``troupe-dep`` (the model in its own
deployment), ``troupe-tpo`` / ``serve-tpo`` (``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``),
``troupe-proxy`` (Serve's Python proxy actor in place of HAProxy,
``RAY_SERVE_ENABLE_HA_PROXY=0``) and ``serve-haproxy`` (the bare app behind HAProxy).

Each round starts each system (order rotating), runs every scenario against it, and stops
it completely (see ``bench.users_systems``). Run::

    make bench-users                     # or: .venv/bin/python -m bench.users_bench
    .venv/bin/python -m bench.users_bench --rounds 2 --systems troupe,serve

Results: ``bench/results/<UTC>-users.json`` / ``.md`` and ``<UTC>-users-sweep.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from bench.loadgen import LoadSpec, run_load, summarize
from bench.users_systems import (
    MODEL_ID,
    RunningSystem,
    SystemSpec,
    baseline_config,
    python_cmd,
    troupe_config,
)

__all__ = ["main", "SCENARIOS", "SWEEP"]

RESULTS = Path(__file__).resolve().parent / "results"
BIN = Path(sys.executable).parent
LITELLM_KEY = "sk-users-bench-0123456789abcdef"


@dataclass(frozen=True)
class Scenario:
    key: str
    stream: bool
    concurrency: int
    max_tokens: int
    max_requests: int
    duration_s: float


SCENARIOS = (
    Scenario("unary_c1", False, 1, 1, 400, 4.0),
    Scenario("stream_c1", True, 1, 64, 12, 6.0),
    Scenario("stream_c16", True, 16, 64, 96, 6.0),
    Scenario("unary_c32", False, 32, 16, 3000, 5.0),
)
SWEEP = (1, 4, 16, 64)
SWEEP_TOKENS = 16


def _yaml_command(exe: str, config_of) -> Any:
    def command(port: int, workdir: Path) -> list[str]:
        import yaml

        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config_of(port), sort_keys=False))
        return [str(BIN / exe), "run", str(path)]

    return command


def _litellm_command(venv: Path):
    def command(port: int, workdir: Path) -> list[str]:
        cfg = workdir / "litellm.yaml"
        cfg.write_text(
            "model_list:\n"
            f"  - model_name: {MODEL_ID}\n"
            "    litellm_params:\n"
            f"      model: openai/{MODEL_ID}\n"
            "      api_base: os.environ/UB_UPSTREAM\n"
            "      api_key: sk-unused\n"
            "litellm_settings:\n  telemetry: false\n"
            f"general_settings:\n  master_key: {LITELLM_KEY}\n")
        return [str(venv / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1",
                "--port", str(port), "--num_workers", "1"]

    return command


def _uvicorn(factory: str):
    def command(port: int, _workdir: Path = Path(".")) -> list[str]:
        return python_cmd("-m", "uvicorn", factory, "--factory", "--host", "127.0.0.1",
                          "--port", str(port), "--log-level", "warning", "--no-access-log")

    return command


def system_specs(litellm_venv: Path) -> dict[str, SystemSpec]:
    """Every system this bench knows; ``--systems`` picks some."""
    tpo_on = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
    return {
        "troupe": SystemSpec("troupe", _yaml_command(
            "troupe", lambda p: troupe_config(p, run_in="gateway"))),
        "troupe-dep": SystemSpec("troupe-dep", _yaml_command(
            "troupe", lambda p: troupe_config(p, run_in="deployment"))),
        "troupe-tpo": SystemSpec("troupe-tpo", _yaml_command(
            "troupe", lambda p: troupe_config(p, run_in="gateway")), env=tpo_on),
        # `troupe run`'s ingress is Serve's HAProxy (ray[serve] ships the binary) in front
        # of the gateway replica's own HTTP port; this is Serve's Python proxy actor instead.
        "troupe-proxy": SystemSpec("troupe-proxy", _yaml_command(
            "troupe", lambda p: troupe_config(p, run_in="gateway")),
            env={"RAY_SERVE_ENABLE_HA_PROXY": "0"}),
        "serve": SystemSpec("serve", _yaml_command("serve", baseline_config)),
        # The bare app behind the same HAProxy ingress (what a Serve user could turn on).
        "serve-haproxy": SystemSpec("serve-haproxy", _yaml_command("serve", baseline_config),
                                    env={"RAY_SERVE_ENABLE_HA_PROXY": "1"}),
        "serve-tpo": SystemSpec("serve-tpo", _yaml_command("serve", baseline_config),
                                env=tpo_on),
        "uvicorn": SystemSpec("uvicorn", _uvicorn("bench.users_apps:plain_app"), uses_ray=False),
        "litellm": SystemSpec(
            "litellm", _litellm_command(litellm_venv), uses_ray=False,
            helpers=[_uvicorn("bench.users_apps:fake_upstream_app")],
            headers={"Authorization": f"Bearer {LITELLM_KEY}"},
            env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False",
                 "DISABLE_SCHEMA_UPDATE": "True"}),
    }


def _run(system: RunningSystem, stream: bool, concurrency: int, max_tokens: int,
         max_requests: int, duration_s: float) -> dict[str, Any]:
    spec = LoadSpec(system.url, system.spec.model, stream=stream, concurrency=concurrency,
                    max_requests=max_requests, duration_s=duration_s, max_tokens=max_tokens,
                    headers=system.spec.headers)
    results, wall = asyncio.run(run_load(spec))
    return summarize(results, wall)


def measure(system: RunningSystem, quick: bool) -> dict[str, Any]:
    """One round on one running system: warm-up, the scenarios, then the sweep."""
    scale = 0.5 if quick else 1.0
    _run(system, True, 16, 16, 64, 3.0 * scale)  # warm-up, dropped
    out: dict[str, Any] = {}
    for sc in SCENARIOS:
        out[sc.key] = _run(system, sc.stream, sc.concurrency, sc.max_tokens,
                           sc.max_requests, sc.duration_s * scale)
    for c in SWEEP:
        out[f"sweep_c{c}"] = _run(system, False, c, SWEEP_TOKENS, 100 * c, 3.0 * scale)
    return out


# The numbers the issue judges, read from one round's summaries.
METRICS: dict[str, tuple[str, str, Optional[str]]] = {
    "unary p50 ms (c=1)": ("unary_c1", "e2e_ms", "p50"),
    "unary p99 ms (c=1)": ("unary_c1", "e2e_ms", "p99"),
    "stream TTFT p50 ms (c=1)": ("stream_c1", "ttft_ms", "p50"),
    "time/token p50 ms (c=1)": ("stream_c1", "tpot_ms", "p50"),
    "stream TTFT p50 ms (c=16)": ("stream_c16", "ttft_ms", "p50"),
    "time/token p50 ms (c=16)": ("stream_c16", "tpot_ms", "p50"),
    "throughput req/s (c=32)": ("unary_c32", "throughput_rps", None),
}


def read(summary: dict[str, Any], key: str, stat: Optional[str]) -> Optional[float]:
    value = summary.get(key)
    if stat is not None:
        value = (value or {}).get(stat)
    return value


def aggregate(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Median over rounds of every judged metric and sweep point, per system."""
    table: dict[str, dict[str, Any]] = {}
    for name, per_round in rounds.items():
        row: dict[str, Any] = {}
        for label, (sc, key, stat) in METRICS.items():
            vals = [v for r in per_round if (v := read(r[sc], key, stat)) is not None]
            row[label] = statistics.median(vals) if vals else None
        for c in SWEEP:
            for label, key, stat in (("rps", "throughput_rps", None), ("p50", "e2e_ms", "p50"),
                                     ("p99", "e2e_ms", "p99")):
                vals = [v for r in per_round if (v := read(r[f"sweep_c{c}"], key, stat))]
                row[f"sweep {label} c={c}"] = statistics.median(vals) if vals else None
        row["errors"] = sum(s.get("errors", 0) for r in per_round for s in r.values())
        table[name] = row
    return table


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def markdown(table: dict[str, dict[str, Any]], meta: dict[str, Any]) -> str:
    names = list(table)
    lines = [f"# Users-run-it benchmark {meta['started']}", "",
             f"{meta['rounds']} interleaved rounds; systems started alone, one at a time "
             f"(order rotating each round). Median over rounds. Host: {meta['host']}.", "",
             "| metric | " + " | ".join(names) + " | troupe / serve |",
             "|---|" + "---|" * (len(names) + 1)]
    for label in list(METRICS) + [k for k in next(iter(table.values())) if k.startswith("sweep")]:
        cells = [_fmt(table[n].get(label)) for n in names]
        r = ratio(table.get("troupe", {}).get(label), table.get("serve", {}).get(label))
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(r, 2)} |")
    lines.append("| errors | " + " | ".join(str(table[n]["errors"]) for n in names) + " | |")
    t, u = table.get("troupe"), table.get("uvicorn")
    if t and u:
        frac = ratio(t["throughput req/s (c=32)"], u["throughput req/s (c=32)"])
        lines += ["", f"Troupe's throughput at c=32 as a fraction of plain uvicorn's: "
                      f"{_fmt(frac, 3)}"]
    lines += ["", "Start times (s): " + json.dumps(meta["start_s"]), ""]
    lines += [f"- {note}" for note in meta["notes"]]
    return "\n".join(lines) + "\n"


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def plot(table: dict[str, dict[str, Any]], path: Path) -> Optional[str]:
    """Throughput and p50/p99 vs concurrency, one line per system (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib missing: no plot (install the dev extra)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, row in table.items():
        xs = [c for c in SWEEP if row.get(f"sweep rps c={c}")]
        ax1.plot(xs, [row[f"sweep rps c={c}"] for c in xs], marker="o", label=name)
        line, = ax2.plot(xs, [row[f"sweep p50 c={c}"] for c in xs], marker="o", label=f"{name} p50")
        ax2.plot(xs, [row[f"sweep p99 c={c}"] for c in xs], marker="x", linestyle="--",
                 color=line.get_color(), label=f"{name} p99")
    for ax, title, unit in ((ax1, "throughput", "req/s"), (ax2, "latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(list(SWEEP), [str(c) for c in SWEEP])
        ax.set_xlabel("concurrency (unary, max_tokens=16)")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    ax2.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return None


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.users_bench", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--systems", default="troupe,serve,uvicorn,litellm",
                   help="comma list of: troupe, troupe-dep, troupe-tpo, serve, serve-tpo, "
                        "uvicorn, litellm")
    p.add_argument("--quick", action="store_true", help="half-length scenarios")
    p.add_argument("--litellm-venv", default=os.environ.get("LITELLM_VENV", "/tmp/litellm-venv"))
    p.add_argument("--tag", default="users")
    return p.parse_args(argv)


def _on_signal(signum: int, _frame: Any) -> None:
    # Unwind to run()'s finally, which stops the running system outside the handler.
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    specs = system_specs(Path(args.litellm_venv))
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    unknown = [n for n in names if n not in specs]
    if unknown:
        print(f"unknown system(s): {unknown}; known: {sorted(specs)}", file=sys.stderr)
        return 2
    notes: list[str] = []
    if "litellm" in names and not (Path(args.litellm_venv) / "bin" / "litellm").exists():
        names.remove("litellm")
        notes.append(f"LiteLLM skipped: no {args.litellm_venv}/bin/litellm (make bench-remote makes it)")
    started = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    log_dir = Path(f"/tmp/users-bench-{started}")
    log_dir.mkdir(parents=True, exist_ok=True)
    rounds: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    start_s: dict[str, list[float]] = {n: [] for n in names}
    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            system = RunningSystem(specs[name], len(start_s[name]), log_dir)
            try:
                system.start()
                start_s[name].append(round(system.started_s or 0, 1))
                rounds[name].append(measure(system, args.quick))
                row = rounds[name][-1]
                print(f"round {r + 1} {name:15s} start {system.started_s:5.1f}s  "
                      f"unary p50 {read(row['unary_c1'], 'e2e_ms', 'p50'):6.2f} ms  "
                      f"tpot c16 {read(row['stream_c16'], 'tpot_ms', 'p50'):6.2f} ms  "
                      f"rps c32 {row['unary_c32']['throughput_rps']:7.1f}", flush=True)
            finally:
                killed = system.stop()
                if killed:
                    notes.append(f"{name}: had to kill {killed}")
    table = aggregate({n: v for n, v in rounds.items() if v})
    meta = {"started": started, "rounds": args.rounds, "host": os.uname().nodename,
            "cpus": os.cpu_count(), "start_s": start_s, "notes": notes,
            "systems": names, "quick": args.quick}
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{started}-{args.tag}"
    note = plot(table, stem.with_name(stem.name + "-sweep.png"))
    if note:
        meta["notes"].append(note)
    md = markdown(table, meta)
    stem.with_suffix(".md").write_text(md)
    stem.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "table": table, "rounds": rounds}, indent=1))
    print(md)
    print(f"wrote {stem}.md / .json / -sweep.png")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""vLLM's CPU build behind Troupe vs ``vllm serve`` vs Troupe's transformers engine (issue 17).

Three systems serve the bundled SmolLM2-135M-Instruct, each started the way a user starts
it and run alone (``bench.users_systems``: own process tree, own Ray instance, own port):

* ``vllm-serve``: ``vllm serve`` of the safetensors folder ``make models`` writes, from
  ``.venv-vllm`` (vLLM's own OpenAI server, one process plus its engine core; started as
  ``python -m vllm.entrypoints.launchers.api_server.entry``, what ``vllm serve`` runs);
* ``troupe-vllm``: ``troupe run config/vllm-cpu.yaml`` from ``.venv-vllm`` (the same
  weights and engine settings, vLLM ``AsyncLLM`` inside the gateway replica, ``run_in:
  gateway``);
* ``troupe-vllm-deployment``: the same from ``config/vllm-cpu-replicas.yaml`` (the model in
  a Serve deployment of its own: one more streaming hop and Ray process);
* ``troupe-transformers``: ``troupe run`` of config/local.yaml's SmolLM2 entry (the
  default CPU engine, ``auto`` weights, continuous batching) from the main venv.

CPU reservation, the same for all three: the whole 2-core machine, one compute thread for
the model. vLLM's CPU worker binds its OpenMP threads itself (VLLM_CPU_OMP_THREADS_BIND=auto
gives the worker core 0 and leaves core 1 to the server, engine core and, for Troupe, Ray
and the gateway); the transformers engine runs with ``num_threads: 1``. vLLM gets the same
engine arguments in both of its systems (bfloat16, ``max_model_len`` 2048, eager mode, a
1 GiB KV cache, ``max_num_seqs`` 32).

Each concurrency level (1, 2, 4, 8, 16) is a closed loop of streamed chat requests
(``max_tokens`` 64, temperature 0) for ``--duration`` seconds; output tokens/s counts the
usage the server reported, two ways: over the window in which every user kept sending
(``window_tokens_per_s``, each chunk's tokens counted when they arrived; the figure the
ratios use) and, as before, every finished request's tokens over the wall time including
the requests still running at the deadline (``output_tokens_per_s``). The second moves in
steps with the request time when a request is a sizeable share of the duration (see
``bench/loadgen.py``). ``--rounds`` repeats the systems in rotating order; the report
gives each round's Troupe/``vllm serve`` ratio at c=16 (the two ran back to back, so the
shared machine's noise hits a pair alike) and their median, and per level the p50 TPOT
and the tokens per streamed chunk (Troupe's adapter groups tokens under load, see
``deployments/engines/vllm_stream.py``; ``vllm serve`` sends every token). Run under the
shared lock (it starts servers)::

    flock /tmp/troupe-ray.lock .venv/bin/python -m bench.vllm_cpu_bench --vllm-venv .venv-vllm

Results: ``bench/results/<UTC>-vllm-cpu.json`` / ``.md`` / ``.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from bench.loadgen import LoadSpec, run_load, summarize, window_tokens_per_s
from bench.users_systems import REPO, RunningSystem, SystemSpec

__all__ = ["main", "LEVELS", "system_specs"]

RESULTS = Path(__file__).resolve().parent / "results"
LEVELS = (1, 2, 4, 8, 16)
MAX_TOKENS = 64
KV_CACHE_BYTES = 1 << 30
MODEL_DIR = "~/.cache/troupe/models/SmolLM2-135M-Instruct.Q4_1"
VLLM_MODEL_ID = "smollm2-135m-vllm"
CPU_MODEL_ID = "smollm2-135m"
SYSTEMS = ("vllm-serve", "troupe-vllm", "troupe-transformers")
#: Also measurable (--systems): the deployment layout of the same model.
EXTRA_SYSTEMS = ("troupe-vllm-deployment",)


def _troupe_config(source: str, model_id: str, port: int, edit: Callable[[dict], None]) -> dict:
    """``source``'s app with only ``model_id`` and the gateway, on ``port``."""
    config = yaml.safe_load((REPO / source).read_text())
    config["http_options"]["port"] = port
    args = config["applications"][0]["args"]
    args["models"] = [m for m in args["models"] if m["id"] == model_id]
    edit(args["models"][0])
    return config


def _troupe_command(troupe: Path, source: str, model_id: str, edit: Callable[[dict], None]):
    def command(port: int, workdir: Path) -> list[str]:
        path = workdir / "config.yaml"
        path.write_text(yaml.safe_dump(_troupe_config(source, model_id, port, edit), sort_keys=False))
        return [str(troupe), "run", str(path)]

    return command


def _vllm_serve_command(python: Path, model_dir: str):
    # `vllm serve` itself, without its CLI wrapper: the wrapper looks up the version of a
    # distribution named "vllm", and the CPU build's is "vllm-cpu" (PackageNotFoundError).
    def command(port: int, _workdir: Path) -> list[str]:
        return [str(python), "-m", "vllm.entrypoints.launchers.api_server.entry",
                "--model", str(Path(model_dir).expanduser()),
                "--served-model-name", VLLM_MODEL_ID, "--host", "127.0.0.1", "--port", str(port),
                "--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager",
                "--kv-cache-memory-bytes", str(KV_CACHE_BYTES), "--max-num-seqs", "32",
                "--disable-uvicorn-access-log", "--uvicorn-log-level", "warning"]

    return command


def _same_vllm_engine(model: dict) -> None:
    """config/vllm-cpu.yaml's engine, checked to match ``vllm serve``'s arguments."""
    engine = model["engine"]
    extra = engine.get("extra_engine_args", {})
    assert engine["dtype"] == "bfloat16" and engine["max_model_len"] == 2048, engine
    assert extra.get("kv_cache_memory_bytes") == KV_CACHE_BYTES and extra.get("max_num_seqs") == 32, engine


def _transformers_engine(model: dict) -> None:
    """config/local.yaml's engine, with a batch as wide as the widest level."""
    model["engine"]["max_num_seqs"] = max(LEVELS)


def system_specs(vllm_venv: Path, model_dir: str = MODEL_DIR) -> dict[str, SystemSpec]:
    """The systems (see the module docstring)."""
    vbin = vllm_venv.resolve() / "bin"
    main_troupe = Path(sys.executable).parent / "troupe"
    return {
        "vllm-serve": SystemSpec("vllm-serve", _vllm_serve_command(vbin / "python", model_dir),
                                 uses_ray=False, model=VLLM_MODEL_ID, ready_timeout_s=420),
        "troupe-vllm": SystemSpec("troupe-vllm", _troupe_command(
            vbin / "troupe", "config/vllm-cpu.yaml", VLLM_MODEL_ID, _same_vllm_engine),
            model=VLLM_MODEL_ID, ready_timeout_s=480),
        "troupe-vllm-deployment": SystemSpec("troupe-vllm-deployment", _troupe_command(
            vbin / "troupe", "config/vllm-cpu-replicas.yaml", VLLM_MODEL_ID, _same_vllm_engine),
            model=VLLM_MODEL_ID, ready_timeout_s=480),
        "troupe-transformers": SystemSpec("troupe-transformers", _troupe_command(
            main_troupe, "config/local.yaml", CPU_MODEL_ID, _transformers_engine),
            model=CPU_MODEL_ID, ready_timeout_s=420),
    }


def _level(url: str, model: str, concurrency: int, duration_s: float) -> dict[str, Any]:
    spec = LoadSpec(url, model, stream=True, concurrency=concurrency,
                    max_requests=10_000, duration_s=duration_s, max_tokens=MAX_TOKENS,
                    temperature=0.0, request_timeout_s=300)
    window: list[float] = []
    results, wall = asyncio.run(run_load(spec, window))
    return {**summarize(results, wall), "window_tokens_per_s": window_tokens_per_s(results, *window)}


def measure(spec: SystemSpec, index: int, log_dir: Path, duration_s: float) -> dict[str, Any]:
    """Start one system, warm it up, run every level, stop it."""
    system = RunningSystem(spec, index, log_dir)
    try:
        system.start()
        _level(system.url, spec.model, 2, 3.0)  # warm-up: first batches, lazy imports
        levels = {}
        for c in LEVELS:
            levels[str(c)] = _level(system.url, spec.model, c, duration_s)
            s = levels[str(c)]
            ttft = (s["ttft_ms"] or {}).get("p50", float("nan"))
            print(f"  {spec.name:20s} c={c:2d}: {s['window_tokens_per_s']:7.1f} tok/s in the window "
                  f"({s['output_tokens_per_s']:.1f} over the wall time), "
                  f"TTFT p50 {ttft:7.0f} ms, {s['ok']} ok / {s['errors']} errors", flush=True)
        return {"start_s": system.started_s, "levels": levels}
    finally:
        system.stop()


def _combine(runs: list[dict[str, Any]]) -> dict[str, dict[str, Optional[float]]]:
    """Per level: mean tokens/s (both ways) and median TTFT p50 over the rounds."""
    out: dict[str, dict[str, Optional[float]]] = {}
    for c in LEVELS:
        stats = [r["levels"][str(c)] for r in runs]
        ttfts = [s["ttft_ms"]["p50"] for s in stats if s["ttft_ms"]]
        chunk = [s["tokens_per_chunk"] for s in stats if s.get("tokens_per_chunk")]
        tpot = [s["tpot_ms"]["p50"] for s in stats if s.get("tpot_ms")]
        out[str(c)] = {
            "window_tokens_per_s": statistics.fmean(s["window_tokens_per_s"] for s in stats),
            "output_tokens_per_s": statistics.fmean(s["output_tokens_per_s"] for s in stats),
            "requests": statistics.fmean(s["ok"] for s in stats),
            "ttft_p50_ms": statistics.median(ttfts) if ttfts else None,
            "tpot_p50_ms": statistics.median(tpot) if tpot else None,
            "tokens_per_chunk": statistics.fmean(chunk) if chunk else None,
            "errors": sum(s["errors"] for s in stats),
        }
    return out


def _round_ratios(runs: dict[str, list[dict[str, Any]]], level: int = 16,
                  system: str = "troupe-vllm", key: str = "window_tokens_per_s") -> list[float]:
    """``system`` / vllm serve tokens/s (``key``) at ``level``, round by round (the two ran
    back to back in each round, so machine noise hits a pair alike)."""
    serve = {v["round"]: v for v in runs.get("vllm-serve", [])}
    return [t["levels"][str(level)][key] / serve[t["round"]]["levels"][str(level)][key]
            for t in runs.get(system, []) if t["round"] in serve]


def _markdown(report: dict[str, Any]) -> str:
    lines = [f"# vLLM CPU build: {' vs '.join(report['combined'])} ({report['utc']})", "",
             report["setup"], "", "| system | " + " | ".join(f"c={c}" for c in LEVELS) + " |",
             "|---|" + "---|" * len(LEVELS)]
    for key, title, fmt in (("window_tokens_per_s", "tok/s (window)", ".1f"),
                            ("output_tokens_per_s", "tok/s (wall)", ".1f"),
                            ("requests", "requests", ".1f"),
                            ("ttft_p50_ms", "TTFT p50 ms", ".0f"), ("tpot_p50_ms", "TPOT p50 ms", ".1f"),
                            ("tokens_per_chunk", "tokens/chunk", ".2f")):
        for name, combined in report["combined"].items():
            cells = " | ".join(format(combined[str(c)].get(key) or float("nan"), fmt) for c in LEVELS)
            lines.append(f"| {name} {title} | {cells} |")
    ratios = report.get("ratios_c16_by_round") or []
    if ratios:
        wall = report.get("ratios_c16_by_round_wall") or []
        lines += ["", "Troupe (vllm-cpu) / vllm serve, output tokens/s in the window at c=16: "
                  f"median of the rounds **{statistics.median(ratios):.3f}x** (target >= 0.9x); "
                  "by round: " + ", ".join(f"{r:.3f}" for r in ratios)
                  + f"; ratio of the round means {report['ratio_troupe_vllm_over_vllm_serve_c16']:.3f}x."
                  + (f" Over the wall time instead: median {statistics.median(wall):.3f}x; by round: "
                     + ", ".join(f"{r:.3f}" for r in wall) + "." if wall else "")]
    other = report.get("ratios_c16_by_round_deployment") or []
    if other:
        lines += ["", "troupe-vllm-deployment / vllm serve at c=16: median of the rounds "
                  f"{statistics.median(other):.3f}x; by round: " + ", ".join(f"{r:.3f}" for r in other)]
    lines += [f"Failed: {f}" for f in report["failures"]]
    lines += ["", "Start-up seconds (to the first 200): " + ", ".join(
        f"{k} {statistics.fmean(r['start_s'] for r in v):.0f}" for k, v in report["runs"].items())]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, combined in report["combined"].items():
        left.plot(LEVELS, [combined[str(c)]["window_tokens_per_s"] for c in LEVELS], "o-", label=name)
        right.plot(LEVELS, [combined[str(c)]["ttft_p50_ms"] or float("nan") for c in LEVELS], "o-", label=name)
    for ax, title in ((left, "output tokens/s (while every user sends)"), (right, "p50 time to first token (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(LEVELS), [str(c) for c in LEVELS])
        ax.set_xlabel("concurrent streams")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    right.set_yscale("log")
    left.legend()
    fig.suptitle("SmolLM2-135M-Instruct, max_tokens 64, 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def _parse(argv: Optional[list[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.vllm_cpu_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--vllm-venv", type=Path, default=REPO / ".venv-vllm")
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per level")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, system order rotating")
    parser.add_argument("--systems", default=",".join(SYSTEMS),
                        help=f"comma-separated, of {', '.join(SYSTEMS + EXTRA_SYSTEMS)}")
    parser.add_argument("--tag", default="vllm-cpu")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse(argv)
    specs = system_specs(args.vllm_venv)
    names = [n for n in args.systems.split(",") if n]
    utc = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    log_dir = Path("/tmp") / f"vllm-cpu-bench-{utc}"
    log_dir.mkdir()
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    failures: list[str] = []
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for i, name in enumerate(order):
            print(f"round {r + 1}: {name}", flush=True)
            try:
                result = measure(specs[name], r * len(names) + i, log_dir, args.duration)
                runs[name].append({**result, "round": r + 1})
            except (RuntimeError, OSError) as exc:  # one system failing keeps the others' numbers
                failures.append(f"{name} round {r + 1}: {exc}")
                print(f"  {name} failed: {exc} (logs: {log_dir})", flush=True)
    runs = {n: v for n, v in runs.items() if v}
    report: dict[str, Any] = {
        "utc": utc, "levels": list(LEVELS), "max_tokens": MAX_TOKENS, "duration_s": args.duration,
        "rounds": args.rounds, "runs": runs, "failures": failures,
        "combined": {n: _combine(v) for n, v in runs.items()},
        "setup": ("Each system alone on the whole 2-core machine, one compute thread for the "
                  "model (vLLM's worker auto-bound to core 0; transformers num_threads 1); vLLM: "
                  "bfloat16, max_model_len 2048, eager, 1 GiB KV cache, max_num_seqs 32; "
                  "transformers: config/local.yaml (auto weights), max_num_seqs 16. Streamed "
                  f"chat, max_tokens {MAX_TOKENS}, temperature 0, {args.duration:.0f} s per level, "
                  f"{args.rounds} round(s), systems interleaved (order rotating per round): "
                  f"{', '.join(names)}. Troupe's vLLM adapter: stream_interval auto (see "
                  "deployments/engines/vllm_stream.py); vllm serve: its default (every token)."),
    }
    if {"troupe-vllm", "vllm-serve"} <= set(runs):
        report["ratio_troupe_vllm_over_vllm_serve_c16"] = (
            report["combined"]["troupe-vllm"]["16"]["window_tokens_per_s"]
            / report["combined"]["vllm-serve"]["16"]["window_tokens_per_s"])
        report["ratios_c16_by_round"] = _round_ratios(runs)
        report["ratios_c16_by_round_wall"] = _round_ratios(runs, key="output_tokens_per_s")
    if {"troupe-vllm-deployment", "vllm-serve"} <= set(runs):
        report["ratios_c16_by_round_deployment"] = _round_ratios(runs, system="troupe-vllm-deployment")
    stem = RESULTS / f"{utc}-{args.tag}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    stem.with_suffix(".md").write_text(_markdown(report))
    plotted = _plot(report, stem.with_suffix(".png"))
    print(_markdown(report))
    print(f"wrote {stem}.json/.md" + ("/.png" if plotted else " (no matplotlib: no plot)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

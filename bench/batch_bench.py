"""Concurrency sweep of the transformers CPU engine in process (no Ray): tokens/s and TTFT.

Run (under the shared lock)::

    git show <rev>:deployments/engines/transformers_cpu.py > /tmp/engine_before.py
    flock /tmp/troupe-ray.lock python -m bench.batch_bench --baseline-module /tmp/engine_before.py

Each level starts ``c`` streams at once (distinct prompts, temperature 0, max_tokens 64)
and records each stream's time to first token and the aggregate output tokens/s of the
wave. ``--baseline-module`` names a file holding the engine as it was before continuous
batching (the same class name); it runs at c=1 and c=8 in the same process, interleaved
with the new engine's levels. Writes ``bench/results/<stamp>-batching.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from deployments.engines.transformers_cpu import TransformersTextEngine
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams
from serve_app.settings import TransformersEngineConfig

RESULTS = Path(__file__).parent / "results"
TOPICS = ["a lighthouse keeper", "a lost robot", "a dragon who bakes", "two rival chefs",
          "a time-travelling cat", "the last tree on Mars", "a shy volcano", "a detective owl"]


def request(i: int, max_tokens: int) -> GenerationRequest:
    text = f"Write a long story about {TOPICS[i % len(TOPICS)]} (variant {i})."
    return GenerationRequest(
        f"bench-{i}-{time.monotonic_ns()}",
        SamplingParams(max_tokens=max_tokens, temperature=0.0),
        messages=[ChatMessage("user", text)],
    )


async def one(engine: Any, req: GenerationRequest, t0: float) -> tuple[float, int]:
    ttft: Optional[float] = None
    tokens = 0
    async for out in engine.generate(req):
        if ttft is None and out.num_tokens:
            ttft = time.perf_counter() - t0
        tokens += out.num_tokens
    return (ttft if ttft is not None else time.perf_counter() - t0), tokens


async def wave(engine: Any, concurrency: int, max_tokens: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    results = await asyncio.gather(*(one(engine, request(i, max_tokens), t0) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "concurrency": concurrency,
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "per_stream_tokens_per_s": round(tokens / wall / concurrency, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
    }


def load_baseline(path: str) -> type:
    spec = importlib.util.spec_from_file_location("engine_before", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module.TransformersTextEngine


async def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every level, ``--rounds`` times. Each round starts a fresh engine (an empty prefix
    cache, warmed the same way), so rounds repeat one another; the engine before
    batching keeps no state and is loaded once."""
    config = TransformersEngineConfig(num_threads=args.threads, max_num_seqs=args.max_num_seqs,
                                      prefix_cache_tokens=args.prefix_cache_tokens)
    old = None
    if args.baseline_module:
        old = load_baseline(args.baseline_module)("smollm2", TransformersEngineConfig(num_threads=args.threads))
        await old.start()
    rows: dict[str, list[dict[str, Any]]] = {"new": [], "before": []}
    for round_no in range(args.rounds):
        new = TransformersTextEngine("smollm2", config)
        await new.start()
        await wave(new, 2, 8)  # warm-up
        for c in args.levels:
            if old is not None and c in args.baseline_levels:
                rows["before"].append({**await wave(old, c, args.max_tokens), "round": round_no})
                print("before", json.dumps(rows["before"][-1]), flush=True)
            rows["new"].append({**await wave(new, c, args.max_tokens), "round": round_no})
            print("new", json.dumps(rows["new"][-1]), flush=True)
        await new.shutdown()
    if old is not None:
        await old.shutdown()
    return rows


def medians(table: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Per concurrency level, the median of each measure over the rounds."""
    levels: dict[int, list[dict[str, Any]]] = {}
    for r in table:
        levels.setdefault(r["concurrency"], []).append(r)
    keys = ("tokens_per_s", "per_stream_tokens_per_s", "ttft_p50_s", "ttft_max_s")
    return {c: {"concurrency": c, "rounds": len(rs), **{k: round(statistics.median(r[k] for r in rs), 3) for k in keys}}
            for c, rs in sorted(levels.items())}


def summary(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    new, before = medians(rows["new"]), medians(rows["before"])
    lines = ["Medians over rounds (each round: its own waves, in order).", "",
             "| engine | c | rounds | output tok/s | per-stream tok/s | p50 TTFT s | max TTFT s |",
             "|---|---|---|---|---|---|---|"]
    for name, table in (("before", before), ("new", new)):
        for c, r in sorted(table.items()):
            lines.append(f"| {name} | {c} | {r['rounds']} | {r['tokens_per_s']} | {r['per_stream_tokens_per_s']} "
                         f"| {r['ttft_p50_s']} | {r['ttft_max_s']} |")
    lines.append("")
    if 1 in new and 8 in new:
        lines.append(f"- new engine, aggregate tok/s c=8 / c=1: "
                     f"{new[8]['tokens_per_s'] / new[1]['tokens_per_s']:.2f}x (goal >= 4x)")
        lines.append(f"- new engine, p50 TTFT c=8 / c=1: "
                     f"{new[8]['ttft_p50_s'] / new[1]['ttft_p50_s']:.2f}x (goal <= 3x)")
    if 1 in new and 1 in before:
        lines.append(f"- single stream, new / before: "
                     f"{new[1]['tokens_per_s'] / before[1]['tokens_per_s']:.2f}x (goal >= 3x)")
    if 8 in new and 8 in before:
        lines.append(f"- c=8 aggregate, new / before: {new[8]['tokens_per_s'] / before[8]['tokens_per_s']:.2f}x; "
                     f"p50 TTFT before {before[8]['ttft_p50_s']} s, new {new[8]['ttft_p50_s']} s")
    return lines


def plot(rows: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, runs in rows.items():
        table = list(medians(runs).values())
        if not table:
            continue
        cs = [r["concurrency"] for r in table]
        left.plot(cs, [r["tokens_per_s"] for r in table], marker="o", label=f"transformers ({name})")
        right.plot(cs, [r["ttft_p50_s"] for r in table], marker="o", label=f"transformers ({name})")
    left.set(xlabel="concurrent streams", ylabel="output tokens/s (aggregate)", xscale="log", xticks=[1, 2, 4, 8, 16])
    right.set(xlabel="concurrent streams", ylabel="p50 time to first token (s)", xscale="log", xticks=[1, 2, 4, 8, 16])
    for ax in (left, right):
        ax.set_xticklabels(["1", "2", "4", "8", "16"])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Bundled SmolLM2-135M on CPU, max_tokens 64, in process")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def recorded_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as recorded: the baseline by file name only (no machine paths)."""
    recorded = dict(vars(args))
    if args.baseline_module:
        recorded["baseline_module"] = Path(args.baseline_module).name
    return recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--baseline-levels", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--baseline-module", default=None)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every level; the report gives medians")
    parser.add_argument("--prefix-cache-tokens", type=int, default=0,
                        help="engine prefix_cache_tokens (the warm-up fills it with the chat template's prefix)")
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    lines = [f"# Continuous batching sweep (SmolLM2-135M, {args.threads} thread(s), max_tokens {args.max_tokens}, "
             f"prefix cache {args.prefix_cache_tokens} tokens, {args.rounds} round(s))",
             "", *summary(rows)]
    (RESULTS / f"{stamp}-batching.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stamp}-batching.json").write_text(json.dumps({"args": recorded_args(args), **rows}, indent=2))
    plot(rows, RESULTS / f"{stamp}-batching.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

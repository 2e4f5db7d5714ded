"""Concurrency sweep of the transformers CPU engine in process (no Ray): tokens/s and TTFT.

Run (under the shared lock)::

    git show f19cb3b:deployments/engines/transformers_cpu.py > /tmp/engine_at_issue17.py
    git show 3cdf231^:deployments/engines/transformers_cpu.py > /tmp/engine_before_batching.py
    flock /tmp/troupe-ray.lock python -m bench.batch_bench \
        --baseline-module /tmp/engine_at_issue17.py /tmp/engine_before_batching.py

Up to three load shapes per level ``c`` (temperature 0, max_tokens 64):

* **wave**: ``c`` streams start at once; each stream's time to first token and the
  aggregate output tokens/s of the wave.
* **closed loop** (``--closed-requests N``): ``c`` users, each sending its next request
  as soon as its previous one ends, ``N`` requests each: how users load a server, with
  new prompts arriving while others decode. TTFT over every request, tokens/s over the run.
  With max_tokens 64 and no early end the users finish in the same step and send together,
  so this stays close to a train of waves.
* **staggered closed loop** (``--staggered-requests N``): the same users, but user ``u+1``
  joins once user ``u``'s first request has streamed ``max_tokens / c`` tokens, so the
  users are out of step and one new prompt arrives every ``max_tokens / c`` tokens, as
  independent users' requests do. Tokens/s and TTFT over the steady window only: from the
  last user's first request to the first user's last answer (the ramp up and down, with
  fewer than ``c`` users, left out; at ``c = 1`` the whole run).

Every request's prompt is one no earlier request had (a run/round/shape/request id in
the user text); the chat template's system prefix stays shared, as in real traffic, so a
prefix cache can reuse only that. ``--baseline-module`` names files holding earlier
engines (the same class name), each run at ``--baseline-levels`` in the same process,
interleaved with the new engine's levels; a file whose imports have since moved is
loaded with the old module names aliased (:data:`MOVED_MODULES`).
Writes ``bench/results/<stamp>-batching.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import itertools
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


#: Load shapes, in the order the report lists them.
SHAPES = ("wave", "closed", "staggered")

#: Module names an older engine file imports -> where they live now.
MOVED_MODULES = {"serve_app.config": "serve_app.settings"}

#: Makes every prompt of a run one no earlier request had (see the module docstring).
_request_ids = itertools.count()
RUN_ID = time.strftime("%H%M%S")


def request(i: int, max_tokens: int) -> GenerationRequest:
    n = next(_request_ids)
    text = f"Write a long story about {TOPICS[i % len(TOPICS)]} (request {RUN_ID}-{n})."
    return GenerationRequest(
        f"bench-{n}-{time.monotonic_ns()}",
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
    return _row(concurrency, list(results), time.perf_counter() - t0, shape="wave")


async def closed_loop(engine: Any, concurrency: int, max_tokens: int, per_user: int) -> dict[str, Any]:
    """``concurrency`` users, each sending ``per_user`` requests one after another."""
    t0 = time.perf_counter()

    async def user(u: int) -> list[tuple[float, int]]:
        done = []
        for _ in range(per_user):
            done.append(await one(engine, request(u, max_tokens), time.perf_counter()))
        return done

    results = [r for rs in await asyncio.gather(*(user(u) for u in range(concurrency))) for r in rs]
    return _row(concurrency, results, time.perf_counter() - t0, shape="closed")


async def staggered_loop(engine: Any, concurrency: int, max_tokens: int, per_user: int) -> dict[str, Any]:
    """``concurrency`` users out of step (see the module docstring), ``per_user`` requests each."""
    joined = [asyncio.Event() for _ in range(concurrency)]
    joined[0].set()
    step = max(1, max_tokens // concurrency)
    marks: list[tuple[float, int]] = []  # (time, tokens) of every output
    sent: list[tuple[float, float]] = []  # (sent at, ttft) of every request
    starts: list[float] = []
    ends: list[float] = []

    async def user(u: int) -> None:
        await joined[u].wait()
        starts.append(time.perf_counter())
        for r in range(per_user):
            t0 = time.perf_counter()
            ttft, tokens = None, 0
            async for out in engine.generate(request(u, max_tokens)):
                if out.num_tokens:
                    t = time.perf_counter()
                    ttft = t - t0 if ttft is None else ttft
                    tokens += out.num_tokens
                    marks.append((t, out.num_tokens))
                    if r == 0 and tokens >= step and u + 1 < concurrency:
                        joined[u + 1].set()
            joined[min(u + 1, concurrency - 1)].set()  # an early end still lets the next join
            sent.append((t0, ttft if ttft is not None else time.perf_counter() - t0))
        ends.append(time.perf_counter())

    await asyncio.gather(*(user(u) for u in range(concurrency)))
    lo, hi = max(starts), min(ends)
    if hi <= lo:  # too few requests per user for a steady window: the whole run
        lo, hi = min(starts), max(ends)
    tokens = sum(n for t, n in marks if lo <= t <= hi)
    ttfts = [ttft for t0, ttft in sent if lo <= t0 <= hi] or [ttft for _, ttft in sent]
    return {
        "shape": "staggered",
        "concurrency": concurrency,
        "requests": len(ttfts),
        "output_tokens": tokens,
        "wall_s": round(hi - lo, 3),
        "tokens_per_s": round(tokens / (hi - lo), 2),
        "per_stream_tokens_per_s": round(tokens / (hi - lo) / concurrency, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
    }


def _row(concurrency: int, results: list[tuple[float, int]], wall: float, shape: str) -> dict[str, Any]:
    ttfts = [r[0] for r in results]
    tokens = sum(r[1] for r in results)
    return {
        "shape": shape,
        "concurrency": concurrency,
        "requests": len(results),
        "output_tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 2),
        "per_stream_tokens_per_s": round(tokens / wall / concurrency, 2),
        "ttft_p50_s": round(statistics.median(ttfts), 3),
        "ttft_max_s": round(max(ttfts), 3),
    }


def load_baseline(path: str) -> type:
    for old, new in MOVED_MODULES.items():
        try:
            importlib.import_module(old)
        except ImportError:
            sys.modules[old] = importlib.import_module(new)
    spec = importlib.util.spec_from_file_location(f"engine_{Path(path).stem}", path)
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
    olds = {}
    for path in args.baseline_module:
        engine = load_baseline(path)("smollm2", TransformersEngineConfig(num_threads=args.threads))
        await engine.start()
        olds[Path(path).stem] = engine
    rows: dict[str, list[dict[str, Any]]] = {"new": [], **{name: [] for name in olds}}

    def record(name: str, row: dict[str, Any], round_no: int) -> None:
        rows[name].append({**row, "round": round_no})
        print(name, json.dumps(rows[name][-1]), flush=True)

    for round_no in range(args.rounds):
        new = TransformersTextEngine("smollm2", config)
        await new.start()
        await wave(new, 2, 8)  # warm-up
        for c in args.levels:
            for name, old in olds.items():
                if c in args.baseline_levels:
                    record(name, await wave(old, c, args.max_tokens), round_no)
            record("new", await wave(new, c, args.max_tokens), round_no)
            if args.closed_requests:
                record("new", await closed_loop(new, c, args.max_tokens, args.closed_requests), round_no)
            if args.staggered_requests:
                record("new", await staggered_loop(new, c, args.max_tokens, args.staggered_requests), round_no)
        await new.shutdown()
    for old in olds.values():
        await old.shutdown()
    return rows


def medians(table: list[dict[str, Any]], shape: str = "wave") -> dict[int, dict[str, Any]]:
    """Per concurrency level, the median of each measure over the rounds (one load shape)."""
    levels: dict[int, list[dict[str, Any]]] = {}
    for r in table:
        if r.get("shape", "wave") == shape:
            levels.setdefault(r["concurrency"], []).append(r)
    keys = ("tokens_per_s", "per_stream_tokens_per_s", "ttft_p50_s", "ttft_max_s")
    return {c: {"concurrency": c, "rounds": len(rs), **{k: round(statistics.median(r[k] for r in rs), 3) for k in keys}}
            for c, rs in sorted(levels.items())}


def _targets(new: dict[int, dict[str, Any]], label: str) -> list[str]:
    if 1 not in new or 8 not in new:
        return []
    return [f"- {label}: aggregate tok/s c=8 / c=1: "
            f"{new[8]['tokens_per_s'] / new[1]['tokens_per_s']:.2f}x (goal >= 4x); "
            f"p50 TTFT c=8 / c=1: {new[8]['ttft_p50_s'] / new[1]['ttft_p50_s']:.2f}x (goal <= 3x)"]


def summary(rows: dict[str, list[dict[str, Any]]]) -> list[str]:
    lines = ["Medians over rounds (each round: its own waves, in order).", "",
             "| engine | load | c | rounds | output tok/s | per-stream tok/s | p50 TTFT s | max TTFT s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        for shape in SHAPES:
            for c, r in medians(runs, shape).items():
                lines.append(f"| {name} | {shape} | {c} | {r['rounds']} | {r['tokens_per_s']} "
                             f"| {r['per_stream_tokens_per_s']} | {r['ttft_p50_s']} | {r['ttft_max_s']} |")
    lines.append("")
    new = medians(rows["new"])
    lines += _targets(new, "new engine, waves")
    lines += _targets(medians(rows["new"], "closed"), "new engine, closed loop")
    lines += _targets(medians(rows["new"], "staggered"), "new engine, staggered closed loop")
    for name, runs in rows.items():
        before = medians(runs)
        if name != "new" and 1 in new and 1 in before:
            lines.append(f"- single stream, new / {name}: "
                         f"{new[1]['tokens_per_s'] / before[1]['tokens_per_s']:.2f}x (goal >= 3x)")
    return lines


def plot(rows: dict[str, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, runs in rows.items():
        for shape in SHAPES:
            table = list(medians(runs, shape).values())
            if not table:
                continue
            cs = [r["concurrency"] for r in table]
            label = f"transformers ({name}, {shape})"
            left.plot(cs, [r["tokens_per_s"] for r in table], marker="o", label=label)
            right.plot(cs, [r["ttft_p50_s"] for r in table], marker="o", label=label)
    left.set(xlabel="concurrent streams", ylabel="output tokens/s (aggregate)", xscale="log", xticks=[1, 2, 4, 8, 16])
    right.set(xlabel="concurrent streams", ylabel="p50 time to first token (s)", xscale="log", xticks=[1, 2, 4, 8, 16])
    for ax in (left, right):
        ax.set_xticklabels(["1", "2", "4", "8", "16"])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("Bundled SmolLM2-135M on CPU, max_tokens 64, in process, a new prompt per request")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def recorded_args(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as recorded: the baseline by file name only (no machine paths)."""
    recorded = dict(vars(args))
    recorded["baseline_module"] = [Path(path).name for path in args.baseline_module]
    return recorded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--baseline-levels", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--baseline-module", nargs="*", default=[],
                        help="files holding earlier engines (TransformersTextEngine), one or more")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--closed-requests", type=int, default=0,
                        help="also a closed loop per level: each of c users sends this many requests in turn")
    parser.add_argument("--staggered-requests", type=int, default=0,
                        help="also a staggered closed loop per level: c users out of step, this many requests each")
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
             "", "Every request has a prompt no earlier request had (a unique id in the user text; "
             "the chat template's system prefix is shared).", "", *summary(rows)]
    (RESULTS / f"{stamp}-batching.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stamp}-batching.json").write_text(json.dumps({"args": recorded_args(args), **rows}, indent=2))
    plot(rows, RESULTS / f"{stamp}-batching.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Constrained decoding on the bundled SmolLM2, in process: time per output token with a
json_schema constraint vs unconstrained (same run, rounds interleaved), and the grammar
compile time of a 20-property schema, first and cached.

Time per output token (TPOT) of a request is (last token time - first token time) /
(tokens - 1) from its stream, so prompt processing is left out and the two sides compare
decode steps only. Each round runs both sides on the same prompts, alternating which
goes first.

Run (a benchmark: under the shared lock on a shared machine)::

    flock /tmp/troupe-ray.lock python -m bench.constrained_bench --rounds 4

Writes ``bench/results/<UTC>-constrained.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from bench.grammar_bench import schema_20
from serve_app.protocol.internal import ChatMessage, GenerationRequest, ResponseFormat, SamplingParams
from serve_app.settings import TransformersEngineConfig

RESULTS = Path(__file__).resolve().parent / "results"
SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "summary": {"type": "string"},
        "facts": {"type": "array", "items": {"type": "string"}},
        "score": {"type": "integer"},
    },
    "required": ["title", "summary", "facts", "score"],
    "additionalProperties": False,
}
PROMPTS = [
    "Describe the city of Paris in detail.",
    "Tell me about the history of computers.",
    "Explain how bread is made.",
    "Describe a day in the life of a farmer.",
]


async def one(engine: Any, rid: str, prompt: str, constrained: bool, max_tokens: int) -> tuple[float, int]:
    """(TPOT in ms, tokens) of one streamed request."""
    fmt = ResponseFormat("json_schema", SCHEMA, "doc") if constrained else None
    request = GenerationRequest(rid, SamplingParams(max_tokens=max_tokens, temperature=0.0),
                                messages=[ChatMessage("user", prompt)], response_format=fmt)
    stamps: list[float] = []
    tokens = 0
    async for out in engine.generate(request):
        if out.num_tokens:
            stamps.append(time.perf_counter())
            tokens += out.num_tokens
    if len(stamps) < 2:
        return float("nan"), tokens
    return (stamps[-1] - stamps[0]) * 1e3 / max(tokens - 1, 1), tokens


def compile_times(tokenizer: Any, repeats: int) -> dict[str, float]:
    """Compile time of the 20-property schema: a fresh cache each time, then cached."""
    from deployments.engines.constraints import GrammarCache

    first, cached = [], []
    for _ in range(repeats):
        cache = GrammarCache(tokenizer)  # the tokenizer conversion is not the schema's cost
        started = time.perf_counter()
        cache.matcher(schema_20())
        first.append((time.perf_counter() - started) * 1e3)
        started = time.perf_counter()
        cache.matcher(schema_20())
        cached.append((time.perf_counter() - started) * 1e3)
    return {"compile_first_ms": statistics.median(first), "compile_cached_ms": statistics.median(cached)}


async def run(rounds: int, max_tokens: int) -> dict:
    """Load the engine, run the interleaved rounds, and summarise."""
    from deployments.engines.transformers_cpu import TransformersTextEngine

    torch.set_num_threads(1)
    engine = TransformersTextEngine("smollm2", TransformersEngineConfig(num_threads=1))
    await engine.start()
    try:
        await one(engine, "warm", PROMPTS[0], True, 8)
        per_round = []
        for r in range(rounds):
            sides: dict[str, list[float]] = {"free": [], "json_schema": []}
            tokens: dict[str, int] = {"free": 0, "json_schema": 0}
            for i, prompt in enumerate(PROMPTS):
                order = [False, True] if (r + i) % 2 == 0 else [True, False]
                for constrained in order:
                    name = "json_schema" if constrained else "free"
                    tpot, n = await one(engine, f"{name}-{r}-{i}", prompt, constrained, max_tokens)
                    sides[name].append(tpot)
                    tokens[name] += n
            free, constrained = statistics.median(sides["free"]), statistics.median(sides["json_schema"])
            per_round.append({"free_tpot_ms": free, "json_schema_tpot_ms": constrained,
                              "ratio": constrained / free, "tokens": tokens})
            print(json.dumps(per_round[-1]))
        compiles = compile_times(engine._tokenizer, 5)
    finally:
        await engine.shutdown()
    return {
        "free_tpot_ms": statistics.median(r["free_tpot_ms"] for r in per_round),
        "json_schema_tpot_ms": statistics.median(r["json_schema_tpot_ms"] for r in per_round),
        "ratio_paired": statistics.median(r["ratio"] for r in per_round),
        **compiles,
        "rounds": per_round,
    }


def write(summary: dict, args: argparse.Namespace) -> None:
    """The JSON and a markdown table under bench/results/."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "load_avg": os.getloadavg(),
           "rounds": args.rounds, "max_tokens": args.max_tokens, "torch_threads": 1}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}-constrained.json").write_text(json.dumps({"env": env, **summary}, indent=1))
    lines = [
        f"# Constrained decoding on SmolLM2-135M (CPU) — {stamp}", "", f"env: {json.dumps(env)}", "",
        "Medians over rounds; ratio = json_schema / free, median of per-round ratios (rounds interleaved).", "",
        "| measure | value |", "|---|---:|",
        f"| TPOT unconstrained (ms) | {summary['free_tpot_ms']:.2f} |",
        f"| TPOT json_schema (ms) | {summary['json_schema_tpot_ms']:.2f} |",
        f"| ratio (target <= 1.10) | x{summary['ratio_paired']:.3f} |",
        f"| compile 20-property schema, first (ms) | {summary['compile_first_ms']:.2f} |",
        f"| compile 20-property schema, cached (ms) | {summary['compile_cached_ms']:.4f} |",
    ]
    (RESULTS / f"{stamp}-constrained.md").write_text("\n".join(lines) + "\n")
    print("wrote", RESULTS / f"{stamp}-constrained.md")


def main() -> None:
    """Parse flags, run, write."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    summary = asyncio.run(run(args.rounds, args.max_tokens))
    print(json.dumps({k: v for k, v in summary.items() if k != "rounds"}, indent=1))
    if not args.no_write:
        write(summary, args)


if __name__ == "__main__":
    main()

"""LoRA adapters on the bundled SmolLM2 (CPU, no Ray): what an adapter costs on the real
engine path (``LLMDeployment`` -> transformers engine -> the continuous-batching loop, with
the same LRU contract Serve's multiplexing keeps).

* **Cold vs warm first token**: time to the first streamed chunk for a request whose
  adapter is not loaded (it waits for the load, done between two batch-loop steps) and for
  the next request on the same adapter. Six adapters, room for four: cycling through them
  makes every first visit cold. Pairs are interleaved; p50 over ``--cold-rounds`` x 6.
* **Throughput, 1 vs 4 adapters**: ``--concurrency`` concurrent requests in one mixed
  stream, all on one adapter, spread over four (all loaded: no evictions), or on the base
  model. The loop packs them into the same steps and runs one pass per adapter in a step.
  Rounds are interleaved so machine noise hits every variant alike; ratios are reported,
  with the tokens each batch-loop step produced (how much the loop batched).

``python -m bench.lora_bench`` writes ``bench/results/<UTC>-lora.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from deployments.llm import LLMDeployment
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams
from serve_app.settings import ModelConfig
from tests.lora_fixtures import build_smollm2_adapters

RESULTS = Path(__file__).parent / "results"
NAMES = ["one", "two", "three", "four", "five", "six"]


def request(rid: str, adapter: Optional[str], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        rid, SamplingParams(max_tokens=max_tokens, temperature=0.0),
        messages=[ChatMessage("user", f"Tell me about colour number {rid[-1]}.")], adapter=adapter,
    )


async def first_token_ms(dep: LLMDeployment, req: GenerationRequest) -> float:
    started = time.perf_counter()
    stream = dep.stream(req)
    try:
        await stream.__anext__()
        return (time.perf_counter() - started) * 1000.0
    finally:
        await stream.aclose()


async def cold_vs_warm(dep: LLMDeployment, rounds: int) -> dict[str, Any]:
    """Each adapter's first visit in a cycle of six (room for four) is cold, the next warm."""
    cold, warm = [], []
    for r in range(rounds):
        for i, adapter in enumerate(NAMES):
            loads = dep.adapters.loads
            cold.append(await first_token_ms(dep, request(f"c{r}{i}", adapter, 1)))
            assert dep.adapters.loads == loads + 1, "the cold request did not load its adapter"
            warm.append(await first_token_ms(dep, request(f"w{r}{i}", adapter, 1)))
            assert dep.adapters.loads == loads + 1, "the warm request loaded its adapter again"
    return {
        "cold_ms": cold, "warm_ms": warm,
        "cold_p50_ms": statistics.median(cold), "warm_p50_ms": statistics.median(warm),
        "cold_over_warm": statistics.median(cold) / statistics.median(warm),
    }


async def stream_throughput(dep: LLMDeployment, adapters: list[Optional[str]], n: int,
                            max_tokens: int) -> tuple[float, float]:
    """Completion tokens per second for ``n`` concurrent requests, adapters round-robin,
    and completion tokens per batch-loop step."""
    steps = dep.engine._loop.steps
    started = time.perf_counter()
    results = await asyncio.gather(*(
        dep.complete(request(f"t{i}", adapters[i % len(adapters)], max_tokens)) for i in range(n)
    ))
    elapsed = time.perf_counter() - started
    tokens = sum(r.completion_tokens for r in results)
    return tokens / elapsed, tokens / max(1, dep.engine._loop.steps - steps)


async def main(cold_rounds: int, rounds: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="troupe-lora-"))
    paths = build_smollm2_adapters(folder, NAMES)
    model = ModelConfig.model_validate({
        "id": "smollm2", "engine": {"type": "transformers", "num_threads": 1},
        "adapters": {"paths": paths, "max_loaded": 4, "max_rank": 8},
    })
    dep = LLMDeployment(model)
    await dep.start()
    try:
        latency = await cold_vs_warm(dep, cold_rounds)
        variants: dict[str, list[Optional[str]]] = {
            "base": [None], "1_adapter": ["one"], "4_adapters": NAMES[:4]}
        await stream_throughput(dep, NAMES[:4], 4, 2)  # warm-up: one..four loaded
        loads = dep.adapters.loads
        tps: dict[str, list[float]] = {k: [] for k in variants}
        per_step: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, adapters in variants.items():
                rate, tokens_per_step = await stream_throughput(dep, adapters, concurrency, max_tokens)
                tps[name].append(rate)
                per_step[name].append(tokens_per_step)
        assert dep.adapters.loads == loads, "an adapter was reloaded during the throughput rounds"
        weights = dep.engine.config.weights
    finally:
        await dep.shutdown()
    medians = {k: statistics.median(v) for k, v in tps.items()}
    return {
        "setup": {"model": f"SmolLM2-135M-Instruct (bundled, {weights} weights, 1 thread)",
                  "path": "LLMDeployment -> transformers engine -> batch loop (in process)",
                  "adapters": "r=4 on q_proj/v_proj, 6 built, room for 4",
                  "cold_rounds": cold_rounds, "rounds": rounds,
                  "concurrency": concurrency, "max_tokens": max_tokens},
        "first_token": latency,
        "throughput_tokens_per_s": {"rounds": tps, "median": medians,
                                    "4_over_1": medians["4_adapters"] / medians["1_adapter"],
                                    "1_over_base": medians["1_adapter"] / medians["base"]},
        "tokens_per_step": {k: statistics.median(v) for k, v in per_step.items()},
    }


def report(result: dict[str, Any]) -> str:
    ft, tp, step = result["first_token"], result["throughput_tokens_per_s"], result["tokens_per_step"]
    return "\n".join([
        "# LoRA adapters on the bundled SmolLM2 (CPU)", "",
        f"Setup: {json.dumps(result['setup'])}", "",
        "| measure | value |", "|---|---|",
        f"| first token, cold adapter (p50 of {len(ft['cold_ms'])}) | {ft['cold_p50_ms']:.0f} ms |",
        f"| first token, warm adapter (p50 of {len(ft['warm_ms'])}) | {ft['warm_p50_ms']:.0f} ms |",
        f"| cold / warm | {ft['cold_over_warm']:.2f}x |",
        f"| tokens/s, base model | {tp['median']['base']:.1f} |",
        f"| tokens/s, 1 adapter | {tp['median']['1_adapter']:.1f} |",
        f"| tokens/s, 4 adapters mixed | {tp['median']['4_adapters']:.1f} |",
        f"| 4 adapters / 1 adapter | {tp['4_over_1']:.2f}x |",
        f"| 1 adapter / base | {tp['1_over_base']:.2f}x |",
        f"| tokens per batch-loop step: base / 1 / 4 adapters | {step['base']:.2f} / "
        f"{step['1_adapter']:.2f} / {step['4_adapters']:.2f} |",
    ]) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cold-rounds", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    out = asyncio.run(main(args.cold_rounds, args.rounds, args.concurrency, args.max_tokens))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}-lora.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"{stamp}-lora.md").write_text(report(out))
    print(report(out))

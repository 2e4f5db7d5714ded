"""LoRA adapters on the bundled SmolLM2 (CPU, no Ray): what an adapter costs.

* **Cold vs warm first token**: time to the first streamed chunk for an adapter's first
  request (it waits for the adapter to load) and for the next one (already loaded),
  interleaved over several adapters.
* **Throughput, 1 vs 4 adapters**: the same mixed stream of concurrent requests, all on
  one adapter or spread over four (room for four: no evictions), and on the base model.
  Rounds are interleaved so machine noise hits every variant alike; ratios are reported.
* **One step, mixed adapters**: one forward over a batch whose rows use the same adapter,
  four different adapters (peft's ``adapter_names``), or none: what a continuous-batching
  step pays to mix adapters.

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

import torch

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


async def cold_vs_warm(dep: LLMDeployment, adapters: list[str]) -> dict[str, Any]:
    cold, warm = [], []
    for i, adapter in enumerate(adapters):  # each adapter's first use is cold, then warm
        cold.append(await first_token_ms(dep, request(f"c{i}", adapter, 1)))
        warm.append(await first_token_ms(dep, request(f"w{i}", adapter, 1)))
    return {
        "cold_ms": cold, "warm_ms": warm,
        "cold_p50_ms": statistics.median(cold), "warm_p50_ms": statistics.median(warm),
        "cold_over_warm": statistics.median(cold) / statistics.median(warm),
    }


async def stream_throughput(dep: LLMDeployment, adapters: list[Optional[str]], n: int,
                            max_tokens: int) -> float:
    """Completion tokens per second for ``n`` concurrent requests, adapters round-robin."""
    started = time.perf_counter()
    results = await asyncio.gather(*(
        dep.complete(request(f"t{i}", adapters[i % len(adapters)], max_tokens)) for i in range(n)
    ))
    return sum(r.completion_tokens for r in results) / (time.perf_counter() - started)


def mixed_step_ms(dep: LLMDeployment, rows: int, repeats: int) -> dict[str, float]:
    """One forward over ``rows`` sequences: one adapter, mixed adapters, or none."""
    engine = dep.engine
    ids = torch.tensor([engine.encode(request("s0", None, 1))] * rows)
    variants = {"base": [None] * rows, "same_adapter": ["one"] * rows,
                "mixed_adapters": [NAMES[i % 4] for i in range(rows)]}
    times: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        for _ in range(repeats):
            for name, names in variants.items():
                model, kwargs = engine._lora.generate_target(names)
                started = time.perf_counter()
                model(input_ids=ids, **kwargs)
                times[name].append((time.perf_counter() - started) * 1000.0)
    return {name: statistics.median(values) for name, values in times.items()}


async def main(rounds: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="troupe-lora-"))
    paths = build_smollm2_adapters(folder, NAMES)
    model = ModelConfig.model_validate({
        "id": "smollm2", "engine": {"type": "transformers", "num_threads": 1},
        "adapters": {"paths": paths, "max_loaded": 4, "max_rank": 8},
    })
    dep = LLMDeployment(model)
    await dep.start()
    try:
        # Adapters five and six are cold here; then one..four are loaded for the rest.
        latency = await cold_vs_warm(dep, ["five", "six", "one", "two", "three", "four"])
        variants: dict[str, list[Optional[str]]] = {
            "base": [None], "1_adapter": ["one"], "4_adapters": NAMES[:4]}
        tps: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(rounds):
            for name, adapters in variants.items():
                tps[name].append(await stream_throughput(dep, adapters, concurrency, max_tokens))
        step = await asyncio.to_thread(mixed_step_ms, dep, 4, 10)
    finally:
        await dep.shutdown()
    medians = {k: statistics.median(v) for k, v in tps.items()}
    return {
        "setup": {"model": "SmolLM2-135M-Instruct (bundled, fp32, 1 thread)",
                  "adapters": "r=4 on q_proj/v_proj", "rounds": rounds,
                  "concurrency": concurrency, "max_tokens": max_tokens},
        "first_token": latency,
        "throughput_tokens_per_s": {"rounds": tps, "median": medians,
                                    "4_over_1": medians["4_adapters"] / medians["1_adapter"],
                                    "1_over_base": medians["1_adapter"] / medians["base"]},
        "one_forward_4_rows_ms": step,
    }


def report(result: dict[str, Any]) -> str:
    ft, tp, step = result["first_token"], result["throughput_tokens_per_s"], result["one_forward_4_rows_ms"]
    return "\n".join([
        "# LoRA adapters on the bundled SmolLM2 (CPU)", "",
        f"Setup: {json.dumps(result['setup'])}", "",
        "| measure | value |", "|---|---|",
        f"| first token, cold adapter (p50) | {ft['cold_p50_ms']:.0f} ms |",
        f"| first token, warm adapter (p50) | {ft['warm_p50_ms']:.0f} ms |",
        f"| cold / warm | {ft['cold_over_warm']:.2f}x |",
        f"| tokens/s, base model | {tp['median']['base']:.1f} |",
        f"| tokens/s, 1 adapter | {tp['median']['1_adapter']:.1f} |",
        f"| tokens/s, 4 adapters mixed | {tp['median']['4_adapters']:.1f} |",
        f"| 4 adapters / 1 adapter | {tp['4_over_1']:.2f}x |",
        f"| one forward, 4 rows: base / same adapter / 4 mixed | {step['base']:.1f} / "
        f"{step['same_adapter']:.1f} / {step['mixed_adapters']:.1f} ms |",
    ]) + "\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    out = asyncio.run(main(args.rounds, args.concurrency, args.max_tokens))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}-lora.json").write_text(json.dumps(out, indent=2))
    (RESULTS / f"{stamp}-lora.md").write_text(report(out))
    print(report(out))

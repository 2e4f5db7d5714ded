"""Troupe's int4 kernel against torch's on this machine, one thread, in process.

Two parts, each interleaving the two kernels so the machine's load swings hit both alike:

1. the kernel alone on SmolLM2's int4 shapes (fused q/k/v, o, fused gate/up, down) with
   random 4-bit weights, 1 to 16 rows: the fastest of 5 timings of 300 calls each (Troupe's
   with the inputs ``TROUPE_INT4_KERNEL`` picks, int8 by default, and with bf16 inputs);
2. decode steps of the bundled SmolLM2 (weights ``auto``: int4 layers, int8 head) through
   ``ragged.RaggedModel``, once loaded with each kernel: every round starts fresh
   sequences (30-token prompts) and alternates runs of 6 steps; the median step time per
   batch size, and how often the two models' greedy next tokens agree.

    python -m bench.int4_kernel_bench --rounds 5

Writes ``bench/results/<timestamp>-int4-kernel.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from deployments.engines import int4_kernel, ragged
from deployments.engines.gguf_cache import resolve_model_dir
from deployments.engines.weights import load_causal_lm
from serve_app.settings import TransformersEngineConfig

RESULTS = Path(__file__).parent / "results"
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def _fastest(fn: Callable[[], Any], calls: int = 300, repeats: int = 5) -> float:
    """Microseconds per call: the fastest of ``repeats`` timings of ``calls`` calls."""
    for _ in range(30):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def kernels(rows: list[int]) -> list[dict[str, Any]]:
    out = []
    generator = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=generator)
        scale = (torch.rand(n, k // 32, generator=generator) * 0.02).bfloat16()
        zero = (torch.randn(n, k // 32, generator=generator) * 0.01).bfloat16()
        words, scales = int4_kernel.pack(q, scale, zero)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        scales_zeros = torch.stack((scale, zero), -1).transpose(0, 1).contiguous()
        for r in rows:
            x = torch.randn(r, k, generator=generator).bfloat16()
            ours = _fastest(partial(int4_kernel.matmul, x, words, scales))
            bf16 = _fastest(partial(int4_kernel.matmul, x, words, scales, "bf16"))
            torchs = _fastest(partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed, 32, scales_zeros))
            out.append({"shape": f"{n}x{k}", "rows": r, "troupe_us": round(ours, 1),
                        "troupe_bf16_inputs_us": round(bf16, 1), "torch_us": round(torchs, 1)})
            print(out[-1], flush=True)
    return out


def _load(own: bool) -> Any:
    """The bundled model with int4 layers on Troupe's kernel (``own``) or torch's."""
    int4_kernel._tried, int4_kernel._loaded = False, None
    if not own:
        int4_kernel._tried = True  # as where the kernel cannot be built
    model = load_causal_lm(resolve_model_dir(TransformersEngineConfig()), "auto")
    int4_kernel._tried, int4_kernel._loaded = False, None
    return model


def steps(batches: list[int], rounds: int) -> list[dict[str, Any]]:
    models = {"troupe": ragged.RaggedModel(_load(True)), "torch": ragged.RaggedModel(_load(False))}
    assert int4_kernel.load() is not None, "the kernel does not build here"
    out = []
    for batch in batches:
        times: dict[str, list[float]] = {name: [] for name in models}
        agree = total = 0
        for _ in range(rounds):
            states = {}
            for name, stepper in models.items():
                kvs = [stepper.new_kv() for _ in range(batch)]
                logits = stepper.step(kvs, [[1 + (i * 7 + j) % 500 for j in range(30)] for i in range(batch)])
                states[name] = [kvs, logits.argmax(-1).tolist(), []]
            for _ in range(6):
                for name, stepper in models.items():
                    kvs, tokens, seen = states[name]
                    for _ in range(6):
                        t0 = time.perf_counter()
                        logits = stepper.decode(kvs, tokens)
                        tokens = logits.argmax(-1).tolist()
                        times[name].append(time.perf_counter() - t0)
                        seen.append(tokens)
                    states[name][1] = tokens
            for a, b in zip(states["troupe"][2], states["torch"][2], strict=True):
                agree += sum(x == y for x, y in zip(a, b, strict=True))
                total += len(a)
        row: dict[str, Any] = {"batch": batch, "steps": len(times["troupe"])}
        for name, ts in times.items():
            row[f"{name}_median_ms"] = round(1000 * statistics.median(ts), 2)
        row["greedy_agreement"] = round(agree / total, 3)
        out.append(row)
        print(row, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if int4_kernel.load() is None:
        raise SystemExit("Troupe's int4 kernel does not build or run here (see the log)")
    shapes = kernels(args.rows)
    decode = steps(args.batches, args.rounds)
    lines = [f"# Troupe's int4 kernel against torch's (1 thread; load average {os.getloadavg()[0]:.2f} "
             "at the end)", "",
             "Kernel alone, SmolLM2's int4 shapes (fastest of 5 x 300 calls):", "",
             f"| shape | rows | Troupe ({int4_kernel.inputs()} inputs) us | Troupe (bf16 inputs) us "
             "| torch us | torch / Troupe |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['rows']} | {r['troupe_us']} | {r['troupe_bf16_inputs_us']} | {r['torch_us']} "
              f"| {r['torch_us'] / r['troupe_us']:.2f}x |" for r in shapes]
    for rows in args.rows:
        ours = sum(r["troupe_us"] for r in shapes if r["rows"] == rows)
        bf16 = sum(r["troupe_bf16_inputs_us"] for r in shapes if r["rows"] == rows)
        torchs = sum(r["torch_us"] for r in shapes if r["rows"] == rows)
        lines.append(f"| one layer's four | {rows} | {ours:.1f} | {bf16:.1f} | {torchs:.1f} | {torchs / ours:.2f}x |")
    lines += ["", f"Decode steps of the bundled SmolLM2 (weights auto; {args.rounds} rounds x 36 steps "
              "per kernel and batch; medians):", "",
              f"| batch | Troupe ({int4_kernel.inputs()} inputs) ms/step | torch ms/step | torch / Troupe "
              "| greedy next tokens agreeing |",
              "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['troupe_median_ms']} | {r['torch_median_ms']} "
              f"| {r['torch_median_ms'] / r['troupe_median_ms']:.2f}x | {r['greedy_agreement']:.1%} |"
              for r in decode]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}-int4-kernel.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stamp}-int4-kernel.json").write_text(
        json.dumps({"args": vars(args), "kernel": shapes, "decode": decode}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

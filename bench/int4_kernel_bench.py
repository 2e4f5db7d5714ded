"""Troupe's int4 kernel against torch's on this machine, one thread, in process.

Two parts, each interleaving the two kernels so the machine's load swings hit both alike:

1. the kernel alone on SmolLM2's int4 shapes (fused q/k/v, o, fused gate/up, down) with
   random 4-bit weights, 1 to 16 rows: the fastest of 5 timings of 300 calls each (Troupe's
   with the inputs ``TROUPE_INT4_KERNEL`` picks, int8 by default, and with bf16 inputs);
2. decode steps of the bundled SmolLM2 (weights ``auto``: int4 layers, int8 head) through
   ``ragged.RaggedModel``, loaded three times (``SETTINGS``: Troupe's kernels with int8
   inputs, with bf16 inputs, torch's): every round starts fresh sequences (30-token
   prompts) and alternates runs of 6 steps; the median step time per batch size, how often
   each model's greedy next tokens are torch's, and each model's mean next-token loss over
   README.md's first 1,024 tokens.

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


def fastest(fn: Callable[[], Any], calls: int = 300, repeats: int = 5) -> float:
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


def random_int4(n: int, k: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Random 4-bit values [n, k] with bf16 scales and offsets per group of 32."""
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=generator)
    scale = (torch.rand(n, k // 32, generator=generator) * 0.02).bfloat16()
    zero = (torch.randn(n, k // 32, generator=generator) * 0.01).bfloat16()
    return q, scale, zero


def kernels(rows: list[int]) -> list[dict[str, Any]]:
    out = []
    generator = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        q, scale, zero = random_int4(n, k, generator)
        words, scales = int4_kernel.pack(q, scale, zero)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        scales_zeros = torch.stack((scale, zero), -1).transpose(0, 1).contiguous()
        for r in rows:
            x = torch.randn(r, k, generator=generator).bfloat16()
            ours = fastest(partial(int4_kernel.matmul, x, words, scales))
            bf16 = fastest(partial(int4_kernel.matmul, x, words, scales, "bf16"))
            torchs = fastest(partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x, packed, 32, scales_zeros))
            out.append({"shape": f"{n}x{k}", "rows": r, "troupe_us": round(ours, 1),
                        "troupe_bf16_inputs_us": round(bf16, 1), "torch_us": round(torchs, 1)})
            print(out[-1], flush=True)
    return out


#: The kernels compared: Troupe's with int8 inputs (its int8 head too), with bf16 inputs
#: (torch's int8 head), and torch's alone (``TROUPE_INT4_KERNEL`` at load).
SETTINGS = {"troupe": "int8", "troupe-bf16": "bf16", "torch": "torch"}


def _load(setting: str) -> Any:
    """The bundled model loaded with ``TROUPE_INT4_KERNEL=setting``."""
    before = os.environ.get("TROUPE_INT4_KERNEL")
    os.environ["TROUPE_INT4_KERNEL"] = setting
    int4_kernel._tried, int4_kernel._loaded = False, None
    try:
        return load_causal_lm(resolve_model_dir(TransformersEngineConfig()), "auto")
    finally:
        if before is None:
            del os.environ["TROUPE_INT4_KERNEL"]
        else:
            os.environ["TROUPE_INT4_KERNEL"] = before
        int4_kernel._tried, int4_kernel._loaded = False, None


def steps(models: dict[str, Any], batches: list[int], rounds: int) -> list[dict[str, Any]]:
    steppers = {name: ragged.RaggedModel(model) for name, model in models.items()}
    assert int4_kernel.load() is not None, "the kernel does not build here"
    out = []
    for batch in batches:
        times: dict[str, list[float]] = {name: [] for name in steppers}
        agree = {name: 0 for name in steppers}
        total = 0
        for _ in range(rounds):
            states = {}
            for name, stepper in steppers.items():
                kvs = [stepper.new_kv() for _ in range(batch)]
                logits = stepper.step(kvs, [[1 + (i * 7 + j) % 500 for j in range(30)] for i in range(batch)])
                states[name] = [kvs, logits.argmax(-1).tolist(), []]
            for _ in range(6):
                for name, stepper in steppers.items():
                    kvs, tokens, seen = states[name]
                    for _ in range(6):
                        t0 = time.perf_counter()
                        logits = stepper.decode(kvs, tokens)
                        tokens = logits.argmax(-1).tolist()
                        times[name].append(time.perf_counter() - t0)
                        seen.append(tokens)
                    states[name][1] = tokens
            for name in steppers:
                for a, b in zip(states[name][2], states["torch"][2], strict=True):
                    agree[name] += sum(x == y for x, y in zip(a, b, strict=True))
            total += sum(len(a) for a in states["torch"][2])
        row: dict[str, Any] = {"batch": batch, "steps": len(times["troupe"])}
        for name, ts in times.items():
            row[f"{name}_median_ms"] = round(1000 * statistics.median(ts), 2)
            row[f"{name}_greedy_agreement_with_torch"] = round(agree[name] / total, 3)
        out.append(row)
        print(row, flush=True)
    return out


def losses(models: dict[str, Any]) -> dict[str, float]:
    """Mean next-token loss over README.md's first 1,024 tokens in windows of 256, every
    row through the decode kernels (a plain forward marks no prompt rows)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_dir(TransformersEngineConfig())),
                                              local_files_only=True)
    ids = tokenizer((Path(__file__).parent.parent / "README.md").read_text(), return_tensors="pt").input_ids[0]
    out = {}
    for name, model in models.items():
        values = []
        with torch.inference_mode():
            for start in range(0, 1024, 256):
                window = ids[start:start + 256][None]
                logits = model(input_ids=window).logits[0, :-1].float()
                values.append(torch.nn.functional.cross_entropy(logits, window[0, 1:]).item())
        out[name] = round(statistics.mean(values), 4)
    print(out, flush=True)
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
    models = {name: _load(setting) for name, setting in SETTINGS.items()}
    decode = steps(models, args.batches, args.rounds)
    loss = losses(models)
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
              "per model and batch; medians; troupe: int8 inputs, its own int8 head; troupe-bf16: bf16 "
              "inputs, torch's int8 head; torch: torch's kernels):", "",
              "| batch | troupe ms/step | troupe-bf16 ms/step | torch ms/step | torch / troupe "
              "| greedy next tokens as torch's (troupe, troupe-bf16) |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['troupe_median_ms']} | {r['troupe-bf16_median_ms']} | {r['torch_median_ms']} "
              f"| {r['torch_median_ms'] / r['troupe_median_ms']:.2f}x "
              f"| {r['troupe_greedy_agreement_with_torch']:.1%}, {r['troupe-bf16_greedy_agreement_with_torch']:.1%} |"
              for r in decode]
    lines += ["", "Mean next-token loss over README.md's first 1,024 tokens (every row through the decode "
              "kernels): " + ", ".join(f"{name} {value}" for name, value in loss.items())]
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}-int4-kernel.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stamp}-int4-kernel.json").write_text(
        json.dumps({"args": vars(args), "kernel": shapes, "decode": decode, "loss": loss}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

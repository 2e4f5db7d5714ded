"""Probe: 4-bit weights times int8 inputs (AVX-512 VNNI) against the engine's int4 kernel.

The engine's int4 kernel (``deployments/engines/int4_kernel.c``) is bound, for a batch, by
``vdpbf16ps`` (32 multiply-adds an instruction). ``bench/w4a8_probe.c`` rounds each
row's inputs to int8 per group of 32, as llama.cpp does for its 4-bit formats, and
multiplies with ``vpdpbusd`` (64 an instruction, exact int32 sums). Three parts, one thread:

1. the kernels alone on SmolLM2's int4 shapes, 1 to 16 rows (fastest of 5 x 300 calls),
   each kernel's mean distance from the exact product, and whether each W4A8 row is what
   it is alone;
2. decode steps of the loaded bundled model with each kernel (interleaved, medians);
3. what rounding the inputs costs the model: mean next-token loss over a fixed text
   (every row through the kernel), and greedy answers of 64 tokens to fixed chat prompts,
   each kernel's against the other's.

    python -m bench.w4a8_probe

Writes ``bench/results/<timestamp>-w4a8-probe.{md,json}``. The engine's kernel now takes
int8 inputs this way by default (``int4_kernel.c``'s ``troupe_int4_mm_a8``, on the engine's
own layout); the probe compares its own layout's kernel with the engine's bf16 inputs.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import subprocess
import tempfile
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
SOURCE = Path(__file__).with_name("w4a8_probe.c")
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
ROWS = [1, 2, 4, 8, 16]
PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.",
    "Explain what a hash table is in two sentences.", "Give me three tips for better sleep.",
    "What is 17 times 23?", "Translate 'good morning' into Spanish and German.",
    "Summarize the plot of Romeo and Juliet.", "Why is the sky blue?",
    "List four prime numbers greater than 50.", "How do I reverse a list in Python?",
    "What does a CPU cache do?", "Write a short thank-you note to a teacher.",
    "Name three planets and one fact about each.", "What is photosynthesis?",
    "Describe a cat to someone who has never seen one.", "What are the rules of tic-tac-toe?",
]


def _build(scratch: str) -> Any:
    compiler = shutil.which(os.environ.get("CC") or "cc")
    assert compiler, "needs a C compiler (cc)"
    target = Path(scratch) / "w4a8_probe.so"
    subprocess.run([compiler, "-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                    "-mavx512vnni", "-mfma", "-shared", "-fPIC", str(SOURCE), "-o", str(target)],
                   check=True)
    lib = ctypes.CDLL(str(target))
    lib.probe_w4a8_mm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_void_p]
    return lib


def vnni_words(q: torch.Tensor) -> torch.Tensor:
    """``q`` [N, K] (0..15) in the probe's layout (``w4a8_probe.c``): uint8 [N/16, K/32, 4, 64]."""
    n, k = q.shape
    v = q.to(torch.uint8).reshape(n // 16, 16, k // 32, 4, 2, 4)  # block, lane, group, part, half, i
    packed = v[..., 0, :] | (v[..., 1, :] << 4)  # block, lane, group, part, i
    return packed.permute(0, 2, 3, 1, 4).reshape(n // 16, k // 32, 4, 64).contiguous()


def q_of_words(words: torch.Tensor) -> torch.Tensor:
    """The 4-bit values [N, K] of the engine kernel's ``words`` (``int4_kernel.pack``'s inverse)."""
    blocks, groups = words.shape[:2]
    w = words.to(torch.int32) & 0xFFFF  # block, group, quarter, 32 words (lane, c)
    nibbles = torch.stack([(w >> (4 * n)) & 0xF for n in range(4)], dim=-1)  # ..., word, nibble
    nibbles = nibbles.reshape(blocks, groups, 4, 16, 2, 4).permute(0, 3, 1, 2, 5, 4)
    return nibbles.reshape(blocks * 16, groups * 32)  # lane-major; k = 32 g + 8 u + 2 n + c


class W4A8:
    """Calls the probe kernel on the engine kernel's buffers (re-laid once per buffer)."""

    def __init__(self, lib: Any) -> None:
        self.lib = lib
        self.layouts: dict[tuple[int, tuple[int, ...]], torch.Tensor] = {}

    def __call__(self, flat: torch.Tensor, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
        key = (words.data_ptr(), tuple(words.shape))
        vnni = self.layouts.get(key)
        if vnni is None:
            vnni = self.layouts[key] = vnni_words(q_of_words(words))
        flat = flat.contiguous()
        rows, k = flat.shape
        out = torch.empty(rows, words.shape[0] * 16, dtype=torch.bfloat16)
        if self.lib.probe_w4a8_mm(vnni.data_ptr(), scales.data_ptr(), flat.data_ptr(), rows, k,
                                  out.shape[1], out.data_ptr()) != 0:
            raise MemoryError
        return out


def _fastest(fn: Callable[[], Any], calls: int = 300, repeats: int = 5) -> float:
    for _ in range(30):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def kernels(w4a8: W4A8) -> list[dict[str, Any]]:
    out = []
    generator = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=generator)
        scale = (torch.rand(n, k // 32, generator=generator) * 0.02).bfloat16()
        zero = (torch.randn(n, k // 32, generator=generator) * 0.01).bfloat16()
        words, scales = int4_kernel.pack(q, scale, zero)
        assert torch.equal(q_of_words(words), q)
        exact_w = ((q.reshape(n, -1, 32).double() - 8) * scale.double()[..., None]
                   + zero.double()[..., None]).reshape(n, k)
        x = torch.randn(max(ROWS), k, generator=generator).bfloat16()
        exact = x.double() @ exact_w.T
        alone = torch.cat([w4a8(x[i:i + 1], words, scales) for i in range(len(x))])
        errors = {name: round(float((fn(x, words, scales).double() - exact).abs().mean()
                                    / exact.abs().mean()), 5)
                  for name, fn in (("bf16", partial(int4_kernel.matmul, kind="bf16")), ("w4a8", w4a8))}
        for rows in ROWS:
            xr = x[:rows].contiguous()
            row = {"shape": f"{n}x{k}", "rows": rows,
                   "bf16_us": round(_fastest(partial(int4_kernel.matmul, xr, words, scales, "bf16")), 1),
                   "w4a8_us": round(_fastest(partial(w4a8, xr, words, scales)), 1),
                   "w4a8_rows_as_alone": torch.equal(w4a8(xr, words, scales), alone[:rows]),
                   "relative_error_bf16": errors["bf16"], "relative_error_w4a8": errors["w4a8"]}
            out.append(row)
            print(row, flush=True)
    return out


def _use(kernel: Callable[..., torch.Tensor]) -> None:
    int4_kernel.matmul = kernel  # type: ignore[assignment]  # the probe swaps the engine's kernel


def steps(model: Any, kernels_: dict[str, Callable[..., torch.Tensor]], batches: list[int],
          rounds: int) -> list[dict[str, Any]]:
    stepper = ragged.RaggedModel(model)
    out = []
    for batch in batches:
        times: dict[str, list[float]] = {name: [] for name in kernels_}
        for _ in range(rounds):
            for _ in range(3):
                for name, kernel in kernels_.items():
                    _use(kernel)
                    kvs = [stepper.new_kv() for _ in range(batch)]
                    tokens = stepper.step(kvs, [[1 + (i * 7 + j) % 500 for j in range(30)]
                                                for i in range(batch)]).argmax(-1).tolist()
                    for _ in range(12):
                        t0 = time.perf_counter()
                        tokens = stepper.decode(kvs, tokens).argmax(-1).tolist()
                        times[name].append(time.perf_counter() - t0)
        row: dict[str, Any] = {"batch": batch}
        for name, ts in times.items():
            row[f"{name}_median_ms"] = round(1000 * statistics.median(ts), 2)
        out.append(row)
        print(row, flush=True)
    return out


TEXT = Path(__file__).parent.parent / "README.md"


def quality(model: Any, tokenizer: Any, kernels_: dict[str, Callable[..., torch.Tensor]]) -> dict[str, Any]:
    """Mean next-token loss over README.md's first 1,024 tokens, in 4 windows of 256
    (a plain forward: every row through the decode kernel), and greedy chat answers."""
    ids = tokenizer(TEXT.read_text(), return_tensors="pt").input_ids[0][:1024]
    out: dict[str, Any] = {"loss": {}, "answers": {}}
    for name, kernel in kernels_.items():
        _use(kernel)
        losses = []
        with torch.inference_mode():
            for start in range(0, len(ids), 256):
                window = ids[start:start + 256][None]
                logits = model(input_ids=window).logits[0, :-1].float()
                losses.append(torch.nn.functional.cross_entropy(logits, window[0, 1:]).item())
        out["loss"][name] = round(statistics.mean(losses), 4)
        stepper = ragged.RaggedModel(model)
        answers = []
        for prompt in PROMPTS:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            kv = stepper.new_kv()
            token = int(stepper.prefill(kv, tokenizer(text).input_ids).argmax())
            answer = [token]
            while len(answer) < 64 and token != tokenizer.eos_token_id:
                token = int(stepper.decode([kv], [token])[0].argmax())
                answer.append(token)
            answers.append(answer)
        out["answers"][name] = answers
        print(name, out["loss"][name], flush=True)
    first, second = (out["answers"][name] for name in kernels_)
    same = [a == b for a, b in zip(first, second, strict=True)]
    diverge = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
               for a, b in zip(first, second, strict=True)]
    out["identical_answers"] = sum(same)
    out["first_difference_at"] = diverge
    out["examples"] = {name: [tokenizer.decode(a) for a in out["answers"][name][:16]] for name in kernels_}
    del out["answers"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 16])
    args = parser.parse_args()
    assert int4_kernel.load() is not None, "the engine's int4 kernel does not build here"
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as scratch:
        w4a8 = W4A8(_build(scratch))
        engine_kernel = int4_kernel.matmul
        report: dict[str, Any] = {"kernels": kernels(w4a8)}
        folder = resolve_model_dir(TransformersEngineConfig())
        model = load_causal_lm(folder, "auto")
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        both = {"bf16": partial(engine_kernel, kind="bf16"), "w4a8": w4a8}
        try:
            report["steps"] = steps(model, both, args.batches, args.rounds)
            report["quality"] = quality(model, tokenizer, both)
        finally:
            _use(engine_kernel)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}-w4a8-probe.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = ["# W4A8 probe: int8 inputs with VNNI against the engine's int4 kernel (1 thread)", "",
             "| shape | rows | engine (bf16 inputs) us | W4A8 us | W4A8 rows as alone |", "|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['rows']} | {r['bf16_us']} | {r['w4a8_us']} | {r['w4a8_rows_as_alone']} |"
              for r in report["kernels"]]
    errors = {r["shape"]: (r["relative_error_bf16"], r["relative_error_w4a8"]) for r in report["kernels"]}
    lines += ["", "Mean distance from the exact product, relative to its mean magnitude (bf16 inputs, W4A8): "
              + ", ".join(f"{s} {a} / {b}" for s, (a, b) in errors.items()), "",
              "| batch | engine ms/step | W4A8 ms/step |", "|---|---|---|"]
    lines += [f"| {r['batch']} | {r['bf16_median_ms']} | {r['w4a8_median_ms']} |" for r in report["steps"]]
    q = report["quality"]
    lines += ["", f"Mean next-token loss over README.md's first 1,024 tokens: engine {q['loss']['bf16']}, "
              f"W4A8 {q['loss']['w4a8']}.", "",
              f"Greedy answers (64 tokens) to {len(PROMPTS)} chat prompts: {q['identical_answers']} identical; "
              f"first differing token at {q['first_difference_at']}."]
    (RESULTS / f"{stamp}-w4a8-probe.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Single-stream decode speed and output quality of the bundled SmolLM2 in several weight formats.

Run (under the shared lock; a couple of minutes)::

    flock /tmp/troupe-ray.lock python -m bench.text_engine_speed

Variants, all on the same CPU reservation (``--threads``, default 1 and 2):

* ``today``: what the engine did before continuous batching: fp32 weights and
  ``model.generate`` (one request at a time).
* ``fp32`` / ``bf16``: the ragged step loop (``deployments.engines.ragged``) on those weights.
* ``int8-dynamic``: torch's ``quantize_dynamic`` of the Linear layers (int8 activations too).
* ``int8``: int8 per-channel weights with bf16 activations (``deployments.engines.weights``;
  the engine's default until ``auto``); ``int8-bf16-head`` keeps the output head in bf16.
* ``auto``: the engine's default: int4 groups of 32 for the layers already on a 4-bit grid
  (all but the output head of the bundled Q4_1 model), int8 for the rest.

Quality: greedy (temperature 0) answers on a fixed prompt set, compared with fp32's
``generate``: the share of prompts whose first 32 tokens are identical (each variant's
answers computed as its engine would: ``generate`` for ``today`` and ``int8-dynamic``, the
ragged step loop for the others), and the top-1 agreement of next-token
predictions along fp32's own continuation (teacher forcing). Writes
``bench/results/<stamp>-text-engine-speed.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from deployments.engines.gguf_cache import resolve_model_dir
from deployments.engines.ragged import RaggedModel
from deployments.engines.weights import load_causal_lm
from serve_app.settings import TransformersEngineConfig

PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain gravity to a child in two sentences.",
    "List three fruits and their colors.",
    "Tell me a joke about cats.",
    "How do I boil an egg?",
    "What is 12 times 7?",
    "Translate 'good morning' into Spanish.",
]
QUALITY_TOKENS = 32
SPEED_TOKENS = 64
RESULTS = Path(__file__).parent / "results"


def load(folder: Path, variant: str) -> Any:
    """The model in one weight format (eval mode, plain sdpa attention)."""
    if variant in ("today", "fp32"):
        return load_causal_lm(folder, "float32")
    if variant == "bf16":
        return load_causal_lm(folder, "bfloat16")
    if variant in ("int8", "auto"):
        return load_causal_lm(folder, variant)
    if variant == "int8-bf16-head":
        from deployments.engines.weights import quantize_linears

        model = load_causal_lm(folder, "bfloat16")
        quantize_linears(model, torch.bfloat16, skip=("lm_head",))
        return model
    if variant == "auto-int4-head":
        return int4_head(load_causal_lm(folder, "auto"), load_causal_lm(folder, "float32"))
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    model = load_causal_lm(folder, "float32")
    return quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8)


def int4_head(model: Any, reference: Any) -> Any:
    """``model`` with its output head re-quantized to 4-bit groups of 32 (each group's own
    min and step, rounded to nearest) from ``reference``'s float32 head: the one layer
    ``auto`` keeps in int8, and a third of a decode step's weight bytes."""
    from deployments.engines.weights import Int4WeightLinear, nearest_four_bit_grid

    head = reference.lm_head
    model.lm_head = Int4WeightLinear(head, nearest_four_bit_grid(head.weight), torch.bfloat16)
    torch.nn.Module.to(model.lm_head, torch.bfloat16)
    return model


def encode(tok: Any, prompt: str) -> list[int]:
    enc = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(enc["input_ids"])


def greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """Greedy continuation with plain generate (no EOS stop, exactly n tokens)."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False
        )
    return out[0, len(ids):].tolist()


def engine_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """Greedy continuation the way the engine computes it: the ragged step loop
    (prompt rows, then one-token decode steps), exactly n tokens."""
    stepper = RaggedModel(model)
    kv = stepper.new_kv()
    out = [int(stepper.prefill(kv, ids).argmax())]
    while len(out) < n:
        out.append(int(stepper.decode([kv], [out[-1]])[0].argmax()))
    return out


def teacher_forced_top1(model: Any, ids: list[int], ref: list[int]) -> float:
    """Share of positions where the model's argmax equals the reference continuation."""
    x = torch.tensor([ids + ref[:-1]])
    with torch.inference_mode():
        logits = model(input_ids=x).logits[0, len(ids) - 1 :]
    return float((logits.argmax(-1) == torch.tensor(ref)).float().mean())


def decode_speed(model: Any, variant: str, ids: list[int]) -> float:
    """Output tokens per second of one stream (prefill excluded)."""
    if variant == "today":
        x = torch.tensor([ids])
        greedy(model, ids, 2)
        with torch.inference_mode():
            started = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=SPEED_TOKENS,
                           min_new_tokens=SPEED_TOKENS, do_sample=False)
        return SPEED_TOKENS / (time.perf_counter() - started)
    stepper = RaggedModel(model)
    kv = stepper.new_kv()
    token = int(stepper.prefill(kv, ids).argmax())
    started = time.perf_counter()
    for _ in range(SPEED_TOKENS - 1):
        token = int(stepper.decode([kv], [token])[0].argmax())
    return (SPEED_TOKENS - 1) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--variants", nargs="+", default=["today", "fp32", "bf16", "int8-dynamic", "int8"])
    args = parser.parse_args()
    from transformers import AutoTokenizer

    folder = resolve_model_dir(TransformersEngineConfig())
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    prompts = [encode(tok, p) for p in PROMPTS]
    torch.set_num_threads(1)
    reference = load(folder, "fp32")
    refs = [greedy(reference, ids, QUALITY_TOKENS) for ids in prompts]
    rows = []
    for variant in args.variants:
        started = time.perf_counter()
        model = load(folder, variant)
        load_s = time.perf_counter() - started
        answer = greedy if variant in ("today", "int8-dynamic") else engine_greedy
        answers = [answer(model, ids, QUALITY_TOKENS) for ids in prompts]
        row: dict[str, Any] = {
            "variant": variant,
            "load_s": round(load_s, 2),
            "same_answer": sum(a == r for a, r in zip(answers, refs)) / len(refs),
            "top1_agreement": round(sum(teacher_forced_top1(model, i, r) for i, r in zip(prompts, refs)) / len(refs), 4),
            "sample_answer": tok.decode(answers[1])[:80],
        }
        for threads in args.threads:
            torch.set_num_threads(threads)
            speeds = [decode_speed(model, variant, prompts[1]) for _ in range(2)]
            row[f"tok_s_{threads}t"] = round(max(speeds), 1)
        torch.set_num_threads(1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    write(rows, args.threads)


def write(rows: list[dict[str, Any]], threads: list[int]) -> None:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    base = {r["variant"]: r for r in rows}.get("today")
    lines = [
        "# Text engine single-stream speed (bundled SmolLM2-135M, greedy, 64 tokens)",
        "",
        "| variant | load s | " + " | ".join(f"tok/s {t}T (x today)" for t in threads)
        + " | same 32-token answer | top-1 agreement vs fp32 |",
        "|---|---|" + "---|" * len(threads) + "---|---|",
    ]
    for r in rows:
        cells = []
        for t in threads:
            v = r[f"tok_s_{t}t"]
            ratio = f" ({v / base[f'tok_s_{t}t']:.1f}x)" if base else ""
            cells.append(f"{v}{ratio}")
        lines.append(f"| {r['variant']} | {r['load_s']} | " + " | ".join(cells)
                     + f" | {r['same_answer']:.0%} | {r['top1_agreement']:.1%} |")
    (RESULTS / f"{stamp}-text-engine-speed.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stamp}-text-engine-speed.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Prefill time with prompt rows in bf16 calls of 64, 128 and 256 rows against 64 only.

``weights.dense_rows`` sends a step's prompt rows through the bf16 copy of the weights in
calls of the sizes ``weights.dense_call_sizes`` allows (64, and 128 and 256 where a
one-time check finds they round every row as a 64-row call does). This measures what the
larger calls buy, in process on the bundled SmolLM2 (``auto`` weights, one thread): one
prompt of N tokens, and N prompts of 9 tokens each after a shared 40-token cached prefix
(a wave of users whose system prompt is cached), each case timed under both settings in
alternation over ``--rounds`` rounds. It also checks that both settings give the same
logits bit for bit (which they must: only call sizes that agree are used).

    python -m bench.prefill_calls --rounds 5

Writes ``bench/results/<stamp>-prefill-calls.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from deployments.engines import weights
from deployments.engines.gguf_cache import resolve_model_dir
from deployments.engines.ragged import RaggedModel
from serve_app.settings import TransformersEngineConfig

RESULTS = Path(__file__).parent / "results"

#: Setting name -> the larger call sizes ``dense_rows`` may use.
SETTINGS = {"64/128/256 rows": weights.DENSE_SIZES, "64 rows only": ()}


#: Setting name -> its own record of checked call sizes, so that switching settings does
#: not time the (few ms) check again.
_checked: dict[tuple[int, ...], dict[Any, tuple[int, ...]]] = {}


def _use(sizes: tuple[int, ...]) -> None:
    weights.DENSE_SIZES = sizes
    weights._call_sizes = _checked.setdefault(sizes, {})


def _one_prompt(model: RaggedModel, tokens: int) -> Callable[[], torch.Tensor]:
    ids = [100 + i % 4000 for i in range(tokens)]
    return lambda: model.step([model.new_kv()], [ids])


def _wave(model: RaggedModel, prompts: int) -> Callable[[], torch.Tensor]:
    prefix = list(range(100, 140))
    base = model.new_kv()
    model.step([base], [prefix])
    chunks = [[200 + 7 * p + j for j in range(9)] for p in range(prompts)]
    return lambda: model.step([base.fork(len(prefix)) for _ in chunks], chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = TransformersEngineConfig()
    folder = resolve_model_dir(config)
    model = RaggedModel(weights.load_causal_lm(folder, "auto"))
    cases: dict[str, Callable[[RaggedModel], Callable[[], Any]]] = {
        **{f"1 prompt of {n} tokens": (lambda m, n=n: _one_prompt(m, n)) for n in (9, 30, 100, 200, 500, 1000)},
        **{f"{n} prompts of 9 tokens after a cached 40": (lambda m, n=n: _wave(m, n)) for n in (1, 4, 8, 16)},
    }
    times: dict[str, dict[str, list[float]]] = {case: {s: [] for s in SETTINGS} for case in cases}
    same: dict[str, bool] = {}
    with torch.inference_mode():
        for case, make in cases.items():
            run = make(model)
            logits: dict[str, torch.Tensor] = {}
            for round_no in range(args.rounds + 1):  # round 0 warms up
                for name, sizes in SETTINGS.items():
                    _use(sizes)
                    t0 = time.perf_counter()
                    out = run()
                    if round_no:
                        times[case][name].append(time.perf_counter() - t0)
                    logits.setdefault(name, out)
            first, *rest = logits.values()
            same[case] = all(torch.equal(first, other) for other in rest)
            print(case, {n: round(statistics.median(t) * 1e3, 1) for n, t in times[case].items()},
                  "same logits" if same[case] else "LOGITS DIFFER", flush=True)
    _use(SETTINGS["64/128/256 rows"])
    names = list(SETTINGS)
    lines = [f"# Prefill: prompt rows in 64/128/256-row bf16 calls vs 64 only (SmolLM2, auto, 1 thread, "
             f"{args.rounds} rounds, medians)", "",
             f"call sizes found for SmolLM2's projections: "
             f"{sorted({weights.dense_call_sizes(g.dense) for g in _groups(model)})}", "",
             f"| case | {names[0]} ms | {names[1]} ms | speed-up | same logits |", "|---|---|---|---|---|"]
    for case in cases:
        a, b = (statistics.median(times[case][n]) * 1e3 for n in names)
        lines.append(f"| {case} | {a:.1f} | {b:.1f} | {b / a:.2f}x | {'yes' if same[case] else 'NO'} |")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + (f"-{args.tag}" if args.tag else "")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}-prefill-calls.md").write_text("\n".join(lines) + "\n")
    (RESULTS / f"{stamp}-prefill-calls.json").write_text(json.dumps(
        {"rounds": args.rounds, "times_s": times, "same_logits": same}, indent=2))
    print("\n".join(lines))


def _groups(model: RaggedModel) -> list[Any]:
    """The model's quantized layers and fused groups (each holds a ``dense`` copy)."""
    found = {id(m.group) if m.group is not None else id(m): (m.group or m)
             for m in model.model.modules() if isinstance(m, weights.QuantizedLinear)}
    return [g for g in found.values() if g.dense.shape[0] != model.model.config.vocab_size]


if __name__ == "__main__":
    main()

"""Decode-step A/B of ragged steppers on the bundled SmolLM2 (int8, one thread), in process.

Each stepper file is a ``ragged.py`` (e.g. ``git show REV:deployments/engines/ragged.py >
/tmp/ragged_REV.py``); the tree's own ``ragged`` runs as ``new``. All share one loaded
model. Per batch size, every round starts fresh sequences (30-token prompts) for each
stepper, then alternates short runs of decode steps between them, so the machine's load
swings hit every stepper alike; every step is timed on its own. Reported: the median and
the 10th percentile of the step times, and whether every stepper's logits equal the first
one's bit for bit. Run under the shared lock::

    flock /tmp/troupe-ray.lock python -m bench.step_ab /tmp/ragged_before.py --rounds 5
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from deployments.engines import ragged
from deployments.engines.gguf_cache import resolve_model_dir
from deployments.engines.weights import load_causal_lm
from serve_app.settings import TransformersEngineConfig

RESULTS = Path(__file__).parent / "results"


def _stepper(path: str, model: Any) -> Any:
    spec = importlib.util.spec_from_file_location(f"ragged_{Path(path).stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.RaggedModel(model)


def _start(stepper: Any, batch: int) -> list[Any]:
    kvs = [stepper.new_kv() for _ in range(batch)]
    logits = stepper.step(kvs, [[1 + (i * 7 + j) % 500 for j in range(30)] for i in range(batch)])
    return [kvs, logits.argmax(-1).tolist(), [logits]]


def _steps(stepper: Any, state: list[Any], n: int, times: list[float]) -> None:
    kvs, tokens, seen = state
    for _ in range(n):
        t0 = time.perf_counter()
        logits = stepper.decode(kvs, tokens)
        tokens = logits.argmax(-1).tolist()
        times.append(time.perf_counter() - t0)
        seen.append(logits)
    state[1] = tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("steppers", nargs="*", help="ragged.py files to compare with this tree's")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = load_causal_lm(resolve_model_dir(TransformersEngineConfig()), "int8")
    steppers = {Path(p).stem: _stepper(p, model) for p in args.steppers}
    steppers["new"] = ragged.RaggedModel(model)
    lines = ["| stepper | batch | steps | median ms/step | p10 ms/step | logits equal the first stepper's |",
             "|---|---|---|---|---|---|"]
    for batch in args.batches:
        times: dict[str, list[float]] = {name: [] for name in steppers}
        equal = {name: True for name in steppers}
        for _ in range(args.rounds):
            states = {name: _start(s, batch) for name, s in steppers.items()}
            for _ in range(6):
                for name, s in steppers.items():
                    _steps(s, states[name], 6, times[name])
            first = states[next(iter(steppers))][2]
            for name, state in states.items():
                equal[name] &= all(torch.equal(a, b) for a, b in zip(first, state[2], strict=True))
        for name, ts in times.items():
            ms = sorted(1000 * t for t in ts)
            lines.append(f"| {name} | {batch} | {len(ms)} | {statistics.median(ms):.2f} "
                         f"| {ms[len(ms) // 10]:.2f} | {equal[name]} |")
        print("\n".join(lines[-len(steppers):]), flush=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    head = (f"# Decode-step A/B (SmolLM2-135M int8, 1 thread, {args.rounds} rounds x 36 steps per "
            f"stepper and batch; steppers: {', '.join(steppers)}; load average "
            f"{os.getloadavg()[0]:.2f} at the end)")
    (RESULTS / f"{stamp}-step-ab.md").write_text("\n".join([head, "", *lines]) + "\n")


if __name__ == "__main__":
    main()

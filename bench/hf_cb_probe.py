"""Probe: transformers' own continuous batching (``generate_batch``) on this CPU, for comparison.

Run (under the shared lock)::

    flock /tmp/troupe-ray.lock python -m bench.hf_cb_probe

Eight chat prompts, greedy, 64 new tokens, one thread: aggregate output tokens/s of
``model.generate_batch`` (fp32 and bf16 weights, its default paged attention). Prints one
JSON line per run; bench/README.md records the numbers beside the engine's own loop.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from bench.text_engine_speed import PROMPTS, encode
from deployments.engines.gguf_cache import resolve_model_dir
from serve_app.settings import TransformersEngineConfig


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    torch.set_num_threads(1)
    folder = resolve_model_dir(TransformersEngineConfig())
    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    inputs = [encode(tok, p) for p in PROMPTS]
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True).eval()
        config = GenerationConfig(max_new_tokens=64, do_sample=False, eos_token_id=-1,
                                  pad_token_id=tok.pad_token_id or 0)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate_batch(inputs=inputs, generation_config=config)
        wall = time.perf_counter() - started
        tokens = sum(len(r.generated_tokens) for r in out.values())
        print(json.dumps({"dtype": str(dtype), "requests": len(inputs), "output_tokens": tokens,
                          "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1)}), flush=True)


if __name__ == "__main__":
    main()

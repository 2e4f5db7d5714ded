"""Probe: would compiling the lean Llama pass (torch.compile, inductor) speed a decode step?

A batch-1 decode step of the bundled SmolLM2 (``auto`` weights, one thread) spends about
6 ms of its 19.5 in some 1,500 small tensor calls around the matmuls; compiling the pass
would fuse them. Here ``llama_pass.LlamaPass``'s operations are compiled with
``dynamic=True``, the attention and every projection as opaque custom ops (they read the
step's packed sequences and prompt-row split, which a graph cannot hold), and compared
with the eager pass: decode-step time at batch 1 and 8 (medians of 30 steps, two
rounds), the largest logit difference, and whether a row's logits alone equal its logits
in a batch of 8 (what the engine promises: batching changes no output).

    python -m bench.compiled_step_probe

Writes ``bench/results/<stamp>-compiled-step-probe.md``. A probe, not a path the engine
takes: see bench/README.md for what it found.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Optional

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from deployments.engines import llama_pass, ragged, weights
from deployments.engines.gguf_cache import resolve_model_dir
from serve_app.settings import TransformersEngineConfig

#: The step's packed sequences, for the attention op (a graph cannot hold them).
CURRENT: dict[str, Any] = {}
#: The projections the ``troupe_probe::proj`` op runs: (function, output width).
PROJECTIONS: list[tuple[Callable[[torch.Tensor], torch.Tensor], int]] = []
Step = Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]]


@torch.library.custom_op("troupe_probe::attend", mutates_args=())
def attend_op(layer: int, query: torch.Tensor, queries: torch.Tensor, pairs: torch.Tensor,
              scale: float) -> torch.Tensor:
    # _attend_packed may scale ``queries`` in place: an op must not change its inputs
    return ragged._attend_packed(CURRENT["packed"], layer, query, queries.clone(), pairs, scale)


@attend_op.register_fake
def _attend_fake(layer: int, query: torch.Tensor, queries: torch.Tensor, pairs: torch.Tensor,
                 scale: float) -> torch.Tensor:
    return queries.new_empty(queries.shape)


@torch.library.custom_op("troupe_probe::proj", mutates_args=())
def proj_op(flat: torch.Tensor, which: int) -> torch.Tensor:
    return PROJECTIONS[which][0](flat)


@proj_op.register_fake
def _proj_fake(flat: torch.Tensor, which: int) -> torch.Tensor:
    return flat.new_empty(flat.shape[0], PROJECTIONS[which][1])


def _register(fn: Callable[[torch.Tensor], torch.Tensor], width: int) -> int:
    PROJECTIONS.append((fn, width))
    return len(PROJECTIONS) - 1


def main() -> None:
    torch.set_num_threads(1)
    model = weights.load_causal_lm(resolve_model_dir(TransformersEngineConfig()), "auto")
    stepper = ragged.RaggedModel(model)
    lean = stepper._pass
    assert lean is not None
    inner, heads, kv_heads, config = model.model, lean.heads, lean.kv_heads, model.config
    head_dim = config.hidden_size // heads
    layers = [(layer, _register(layer.qkv, (heads + 2 * kv_heads) * head_dim),
               _register(layer.o, config.hidden_size), _register(layer.gate_up, 2 * config.intermediate_size),
               _register(layer.down, config.hidden_size))
              for layer in lean.layers]
    head = _register(model.lm_head, config.vocab_size)

    def core(input_ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """``LlamaPass.__call__``'s operations, the rotation written out of place."""
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, positions)
        hidden, cos, sin = hidden[0], cos[0].unsqueeze(1), sin[0].unsqueeze(1)
        tokens, dim, half = hidden.shape[0], cos.shape[-1], cos.shape[-1] // 2
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        rotated = heads + kv_heads
        for layer, qkv_i, o_i, gate_up_i, down_i in layers:
            x = llama_pass._rms_norm(layer.norm_in, hidden)
            qkv = proj_op(x, qkv_i).view(tokens, -1, dim)
            qk = qkv[:, :rotated]
            qk = qk * cos + qk.view(tokens, rotated, 2, half).flip(2).view(qk.shape) * sin
            qkv = torch.cat((qk, qkv[:, rotated:]), dim=1)
            wide = qkv.float()
            out = attend_op(layer.number, qkv[:, :heads].transpose(0, 1)[None], wide[:, :heads],
                            wide[:, heads:].view(tokens, 2, kv_heads, dim), layer.scaling)
            hidden = hidden + proj_op(out.to(hidden.dtype).view(tokens, -1), o_i)
            x = llama_pass._rms_norm(layer.norm_post, hidden)
            gate_up = proj_op(x, gate_up_i)
            width = gate_up.shape[-1] // 2
            hidden = hidden + proj_op(layer.act(gate_up[:, :width]) * gate_up[:, width:], down_i)
        return proj_op(llama_pass._rms_norm(lean.norm, hidden)[last], head)

    compiled = torch.compile(core, dynamic=True)

    def through_compiled(input_ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor,
                         attend: Any) -> torch.Tensor:
        """In ``LlamaPass``'s place: ``attend`` is the step's ``Packed.attend``."""
        CURRENT["packed"] = attend.__self__
        return compiled(input_ids, positions, last)

    def step(kvs: list[Any], chunks: list[list[int]], fn: Step) -> torch.Tensor:
        """``RaggedModel.step`` through the eager pass (None) or ``fn``."""
        stepper._pass = lean if fn is None else through_compiled  # type: ignore[assignment]
        return stepper.step(kvs, chunks)

    prefix = list(range(100, 140))

    def run(batch: int, fn: Step, steps: int = 30) -> tuple[list[torch.Tensor], float]:
        kvs = [stepper.new_kv() for _ in range(batch)]
        for kv in kvs:
            step([kv], [prefix], fn)
        outs, times = [], []
        for i in range(steps):
            t0 = time.perf_counter()
            outs.append(step(kvs, [[300 + i + j] for j in range(batch)], fn))
            times.append(time.perf_counter() - t0)
        return outs, statistics.median(times) * 1e3

    t0 = time.perf_counter()
    run(1, compiled, 3)
    run(8, compiled, 3)
    lines = ["# Compiled lean Llama pass vs eager (SmolLM2, auto, 1 thread)", "",
             f"compile (first calls at batch 1 and 8): {time.perf_counter() - t0:.1f} s", ""]
    print(lines[2], flush=True)
    for round_no in range(2):
        for batch in (1, 8):
            eager_out, eager_ms = run(batch, None)
            compiled_out, compiled_ms = run(batch, compiled)
            diff = max((a - c).abs().max().item() for a, c in zip(eager_out, compiled_out))
            lines.append(f"- round {round_no}, batch {batch}: eager {eager_ms:.2f} ms, compiled "
                         f"{compiled_ms:.2f} ms a decode step; largest logit difference {diff:.4f}")
            print(lines[-1], flush=True)
    # the engine's promise: a row's logits alone equal its logits in a batch
    alone = stepper.new_kv()
    step([alone], [prefix], compiled)
    batch_kvs = [stepper.new_kv() for _ in range(8)]
    for kv in batch_kvs:
        step([kv], [prefix], compiled)
    same = all(torch.equal(step([alone], [[400 + i]], compiled)[0],
                           step(batch_kvs, [[400 + i]] + [[500 + i + j] for j in range(7)], compiled)[0])
               for i in range(10))
    lines.append(f"- compiled: a row alone equals the same row in a batch of 8 (10 steps): {same}")
    print(lines[-1])
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    (results / f"{stamp}-compiled-step-probe.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""How the CPU text engine holds its weights: int8 (default), bfloat16 or float32.

Decoding a small model on one CPU thread is bound by reading the weights once per step,
so the fewer bytes per weight the faster each token. ``int8`` keeps each Linear layer's
weight as int8 with one scale per output channel and multiplies with bf16 activations
(``torch.ops.aten._weight_int8pack_mm``, the weight-only kernel torchao and gpt-fast use
on CPU); nothing else is quantized. Unlike torch's dynamic quantization, activations are
not quantized per batch, so a row's result does not depend on which other rows share the
batch: batching changes no output. Measurements: ``bench/text_engine_speed.py``.

That kernel is the fastest for a few rows (decoding) but slow for many: a prompt's tokens
go through a bf16 copy of the same de-quantized weights instead (oneDNN's bf16 matmul,
about 2.7x faster for 320 rows here; see ``bench/README.md``). Which rows are prompt rows
is set per packed step (:func:`prompt_rows`) from each sequence's own chunk, never from its
neighbours, and both matmuls are row-independent, so batching still changes no output. The
copy costs 2 bytes per weight (SmolLM2: about 270 MB more, still less than fp32).

oneDNN's bf16 matmul picks its blocking by the number of rows: on CPUs with AMX a call
of 33 or more rows rounds some rows differently than a call of a few (a batch of prompts
then changed a sampled answer), while any two calls of the same size give each row the
same result wherever it sits and whatever its neighbours. So prompt rows always go through
it :data:`DENSE_ROWS` at a time, the last call padded with zero rows (:func:`dense_rows`).
(Row-independence of the bfloat16 and float32 weight kinds' plain Linear layers is not
arranged: float32's matmul differs between one row and two; only ``int8`` promises that
batching changes no output.)
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import torch
from torch import nn

__all__ = ["WeightsKind", "Int8WeightLinear", "FusedGroup", "quantize_linears", "fuse_siblings",
           "load_causal_lm", "prompt_rows", "matmul_rows", "dense_rows", "DENSE_ROWS"]

WeightsKind = Literal["int8", "bfloat16", "float32"]

#: The current packed step's prompt rows on this thread (see :func:`prompt_rows`).
_step = threading.local()

#: The rows of every bf16 matmul call of prompt rows (see the module docstring): each
#: row's result is then the same alone or batched. 64: on AMX a 64-row call costs about
#: 1.4x a 32-row one and half of two (tests/unit/test_weights.py checks the invariance).
DENSE_ROWS = 64


@contextmanager
def prompt_rows(is_prompt: Optional[torch.Tensor]) -> Iterator[None]:
    """Within the block, a Linear input with ``len(is_prompt)`` rows sends the rows marked
    True (tokens of prompts) through the bf16 copy; other inputs (the output head's last
    rows) and unmarked rows use the int8 kernel. None: every row uses the int8 kernel."""
    previous = getattr(_step, "split", None)
    split = None
    if is_prompt is not None and bool(is_prompt.any()):
        split = (len(is_prompt), is_prompt.nonzero().squeeze(1), (~is_prompt).nonzero().squeeze(1))
    _step.split = split
    try:
        yield
    finally:
        _step.split = previous


class Int8WeightLinear(nn.Module):
    """A Linear layer whose weight is int8 with a per-output-channel scale (no bias kept)."""

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.to(act_dtype))
        #: The same de-quantized weights in bf16, for prompt rows (many rows at once).
        self.dense: torch.Tensor
        self.register_buffer("dense", (q.float() * scale[:, None]).to(act_dtype), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(act_dtype))
        self.act_dtype = act_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

        #: Set by :func:`fuse_siblings`: the group this layer's weights are a slice of.
        self.group: Optional[FusedGroup] = None

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` [rows, in] times this layer's weights: prompt rows in bf16, others int8."""
        return matmul_rows(flat, self.qweight, self.scale, self.dense, self.out_features)  # type: ignore[arg-type]  # buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.group is not None:
            out = self.group.output(self, x)
        else:
            out = self.matmul(_as(x.reshape(-1, shape[-1]), self.act_dtype))
        if self.bias is not None:
            out = out + self.bias
        return _as(out.reshape(*shape[:-1], self.out_features), x.dtype)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``; without a call when it already is (a decode step makes hundreds)."""
    return x if x.dtype == dtype else x.to(dtype)


def matmul_rows(flat: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, dense: torch.Tensor,
                out_features: int) -> torch.Tensor:
    """``flat`` [rows, in] times int8 weights: this step's prompt rows through ``dense``
    (bf16), the others through the int8 kernel (see :func:`prompt_rows`)."""
    split = getattr(_step, "split", None)
    if split is None or split[0] != flat.shape[0]:
        return torch.ops.aten._weight_int8pack_mm(flat, qweight, scale)
    if len(split[2]) == 0:  # every row is a prompt's
        return dense_rows(flat, dense)
    out = flat.new_empty(flat.shape[0], out_features)
    out[split[1]] = dense_rows(flat[split[1]], dense)
    out[split[2]] = torch.ops.aten._weight_int8pack_mm(flat[split[2]], qweight, scale)
    return out


def dense_rows(flat: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``flat`` [rows, in] times ``dense`` [out, in] (bf16) in calls of exactly
    :data:`DENSE_ROWS` rows (zero rows pad the last), so every row's result is the one it
    gets alone or beside any other rows."""
    rows = flat.shape[0]
    padded = -(-rows // DENSE_ROWS) * DENSE_ROWS
    if padded != rows:
        flat = torch.cat((flat, flat.new_zeros(padded - rows, flat.shape[1])))
    if padded == DENSE_ROWS:
        return torch.nn.functional.linear(flat, dense)[:rows]
    return torch.cat([torch.nn.functional.linear(chunk, dense)
                      for chunk in flat.split(DENSE_ROWS)])[:rows]


class FusedGroup:
    """Sibling int8 layers that read the same input (q/k/v, gate/up) as one matmul.

    Decoding is bound by per-call cost as much as by bytes: one int8 kernel call over the
    concatenated output channels replaces two or three, with the same result per channel
    (each output channel is its own dot product and scale), so outputs do not change. The
    members' buffers become slices of the fused ones (no extra memory). The first member
    computes every member's columns and keeps them for the others, which take their slice
    when called with the very same input tensor and otherwise compute their own.
    """

    def __init__(self, members: list[Int8WeightLinear]) -> None:
        self.lead = members[0]
        self.qweight = torch.cat([m.qweight for m in members]).contiguous()  # type: ignore[misc]  # buffers
        self.scale = torch.cat([m.scale for m in members])  # type: ignore[misc]
        self.dense = torch.cat([m.dense for m in members]).contiguous()
        self.columns: dict[int, tuple[int, int]] = {}
        start = 0
        for m in members:
            end = start + m.out_features
            self.columns[id(m)] = (start, end)
            m.qweight, m.scale, m.dense = self.qweight[start:end], self.scale[start:end], self.dense[start:end]
            m.group = self
            start = end
        #: (input, prompt-row split, fused output) of the lead's last call, set in one
        #: assignment so a second thread (a prompt-logprobs forward) never mixes two calls.
        self._last: Optional[tuple[torch.Tensor, Any, torch.Tensor]] = None

    def output(self, member: Int8WeightLinear, x: torch.Tensor) -> torch.Tensor:
        """``member``'s output for ``x`` ([rows, out_features])."""
        split = getattr(_step, "split", None)
        start, end = self.columns[id(member)]
        last = self._last
        if member is not self.lead and last is not None and last[0] is x and last[1] is split:
            return last[2][:, start:end]
        flat = _as(x.reshape(-1, x.shape[-1]), member.act_dtype)
        if member is not self.lead:
            return member.matmul(flat)
        out = matmul_rows(flat, self.qweight, self.scale, self.dense, self.qweight.shape[0])
        self._last = (x, split, out)
        return out[:, start:end]


#: Sibling layers that read one input in Llama-style blocks (Llama, Mistral, Qwen2, SmolLM).
FUSABLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_siblings(model: nn.Module) -> int:
    """Group the int8 layers named in :data:`FUSABLE` under each module; returns how many
    groups. Layers with a bias or different input sizes stay apart."""
    count = 0
    for module in model.modules():
        for names in FUSABLE:
            members = [getattr(module, n, None) for n in names]
            if all(isinstance(m, Int8WeightLinear) and m.bias is None and m.group is None
                   and m.in_features == members[0].in_features for m in members):
                FusedGroup(members)  # type: ignore[arg-type]  # checked just above
                count += 1
    return count


def quantize_linears(
    model: nn.Module, act_dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = ()
) -> int:
    """Replace every ``nn.Linear`` in ``model`` by an :class:`Int8WeightLinear`; returns how many.

    Layers named in ``skip`` (e.g. ``lm_head``) keep their weights. A tied output head
    (``lm_head`` sharing the embedding) that is quantized gets its own int8 copy; the
    embedding lookup keeps its full-precision table.
    """
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                setattr(module, name, Int8WeightLinear(child, act_dtype))
                count += 1
    return count


def load_causal_lm(folder: Path, weights: WeightsKind) -> Any:
    """Load a causal LM from a local folder in the requested weight format (eval mode)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if weights == "float32" else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    if weights == "int8":
        quantize_linears(model, torch.bfloat16)
        fuse_siblings(model)
    return model.eval()

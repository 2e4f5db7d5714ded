"""How the CPU text engine holds its weights: auto (default), int8, bfloat16 or float32.

Decoding a small model on one CPU thread is bound by reading the weights once per step,
so the fewer bytes per weight the faster each token. ``int8`` keeps each Linear layer's
weight as int8 with one scale per output channel. Decode rows multiply with bf16
activations in torch's weight-only kernel (``torch.ops.aten._weight_int8pack_mm``, the one
torchao and gpt-fast use on CPU), or, where Troupe's own kernel runs with int8 inputs
(see ``auto`` below), with each row's activations rounded to int8 per group of 32
(``int4_kernel.matmul_int8``). Unlike torch's dynamic quantization, activations are never
quantized per batch, so a row's result does not depend on which other rows share the
batch: batching changes no output. Measurements: ``bench/text_engine_speed.py``.

``auto`` reads half those bytes where the weights lose nothing: a layer whose float32
weights sit exactly on a 4-bit grid (every group of 32 input channels ``low + step * q``, q
in 0..15: what a Q4_1 GGUF such as the bundled SmolLM2's de-quantizes to) is held as those
4-bit values (:class:`Int4WeightLinear`; scale and offset rounded to bf16), every other
layer as int8. On the bundled model that is every layer but the output head. Their decode
rows go through Troupe's own kernels (``int4_kernel``) on CPUs with AVX-512 BF16 and
VNNI, which by default round each row's inputs to int8 per group of 32 as llama.cpp does
for these formats (a mean next-token loss on SmolLM2 within 0.1% of bf16 inputs', a half
to a third of the cost for a batch of 8; ``TROUPE_INT4_KERNEL=bf16`` keeps bf16 inputs), else through torch's CPU
weight-only kernels (bf16 inputs). Measurements: ``bench/README.md``.

These kernels are the fastest for a few rows (decoding) but slow for many: a prompt's tokens
go through a bf16 copy of the same de-quantized weights instead (oneDNN's bf16 matmul,
about 2.7x faster for 320 rows here; see ``bench/README.md``). Which rows are prompt rows
is set per packed step (:func:`prompt_rows`) from each sequence's own chunk, never from its
neighbours, and both matmuls are row-independent, so batching still changes no output. The
copy costs 2 bytes per weight (SmolLM2: about 270 MB more, still less than fp32).

oneDNN's bf16 matmul picks its blocking by the number of rows: on CPUs with AMX a call
of 33 or more rows rounds some rows differently than a call of a few (a batch of prompts
then changed a sampled answer), while any two calls of the same size give each row the
same result wherever it sits and whatever its neighbours. So prompt rows always go through
it in calls of a few fixed sizes, the last call padded with zero rows (:func:`dense_rows`):
:data:`DENSE_ROWS`, and the larger :data:`DENSE_SIZES` that give every row exactly what a
:data:`DENSE_ROWS` call gives it. Which larger sizes do depends on the weight's shape and
the CPU (on this AMX VM SmolLM2's shapes agree up to 512 rows, a 2048 x 2048 weight not at
384), so it is checked once per weight shape and thread count on random rows
(:func:`dense_call_sizes`) before a size is used. A call of 64 rows reads all of the
layer's bf16 weights for a few rows' work: 8 prompts joining at once (a wave of users)
take one 256-row call instead of four 64-row ones, 72 ms instead of 174 for SmolLM2 here.
(Row-independence of the bfloat16 and float32 weight kinds' plain Linear layers is not
arranged: float32's matmul differs between one row and two; only ``auto`` and ``int8``
promise that batching changes no output.)

Sibling layers that read the same input (q/k/v, gate/up) are fused into one matmul each
(:func:`fuse_siblings`): fewer kernel calls per step, the same result per output channel.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import torch
from torch import nn

from deployments.engines import int4_kernel

__all__ = ["WeightsKind", "QuantizedLinear", "Int8WeightLinear", "Int4WeightLinear", "four_bit_grid",
           "nearest_four_bit_grid",
           "INT4_GROUP", "FusedGroup", "quantize_linears", "fuse_siblings",
           "load_causal_lm", "prompt_rows", "matmul_rows", "dense_rows", "DENSE_ROWS",
           "DENSE_SIZES", "dense_call_sizes", "split_calls"]

WeightsKind = Literal["auto", "int8", "bfloat16", "float32"]

#: The current packed step's prompt rows on this thread (see :func:`prompt_rows`).
_step = threading.local()

#: The rows of the smallest bf16 matmul call of prompt rows (see the module docstring):
#: each row's result is then the same alone or batched. 64: on AMX a 64-row call costs
#: about 1.4x a 32-row one and half of two (tests/unit/test_weights.py checks the invariance).
DENSE_ROWS = 64

#: Larger calls :func:`dense_rows` may make, each only where :func:`dense_call_sizes` finds
#: it gives every row what a :data:`DENSE_ROWS` call gives it. One thread, SmolLM2's four
#: projections of all 30 layers: 64 rows 43 ms, 128 rows 56 ms, 256 rows 72 ms.
DENSE_SIZES = (128, 256)

#: (out, in, strides, dtype, threads) -> the call sizes found to agree (:func:`dense_call_sizes`).
_call_sizes: dict[tuple[Any, ...], tuple[int, ...]] = {}


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


class QuantizedLinear(nn.Module):
    """A Linear layer held as quantized weights (no float weight kept): prompt rows go
    through a bf16 copy of the de-quantized weights, other rows through :meth:`kernel`."""

    dense: torch.Tensor
    bias: Optional[nn.Parameter]
    act_dtype: torch.dtype
    in_features: int
    out_features: int
    #: Set by :func:`fuse_siblings`: the group this layer's weights are a slice of.
    group: Optional["FusedGroup"] = None

    def kernel(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` [rows, in] times the quantized weights (the decode rows' kernel)."""
        raise NotImplementedError

    def matmul(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` [rows, in] times this layer's weights: prompt rows in bf16, others quantized."""
        return matmul_rows(flat, self.kernel, self.dense, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.group is not None:
            out = self.group.output(self, x)
        else:
            out = self.matmul(_as(x.reshape(-1, shape[-1]), self.act_dtype))
        if self.bias is not None:
            out = out + self.bias
        return _as(out.reshape(*shape[:-1], self.out_features), x.dtype)

    def _keep(self, linear: nn.Linear, dense: torch.Tensor, act_dtype: torch.dtype) -> None:
        """The bf16 copy for prompt rows, the bias and the shape (both kinds alike)."""
        self.register_buffer("dense", dense.to(act_dtype), persistent=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().to(act_dtype))
        self.act_dtype = act_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.group = None


class Int8WeightLinear(QuantizedLinear):
    """A Linear layer whose weight is int8 with a per-output-channel scale (no bias kept).
    Decode rows go through Troupe's int8 kernel (``int4_kernel.matmul_int8``: each row's
    inputs rounded to int8 per group of 32, exact int32 sums) where the int4 kernel runs
    with int8 inputs and the shape fits it, else through torch's weight-only int8 kernel
    (bf16 inputs); each buffer is in its kernel's layout."""

    qweight: torch.Tensor
    scale: torch.Tensor
    #: Whether the weights are in Troupe's int8 kernel's layout, else torch's.
    own_kernel: bool

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype) -> None:
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()
        out_features, in_features = q.shape
        self.own_kernel = (act_dtype == torch.bfloat16 and out_features % 16 == 0 and in_features % 32 == 0
                           and int4_kernel.load() is not None and int4_kernel.inputs() == "int8")
        if self.own_kernel:
            packed, scales = int4_kernel.pack_int8(q, scale.to(act_dtype))
            self.register_buffer("qweight", packed)
            self.register_buffer("scale", scales)
        else:
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale.to(act_dtype))
        #: The same de-quantized weights in bf16, for prompt rows (many rows at once).
        self._keep(linear, q.float() * scale[:, None], act_dtype)

    def kernel(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` [rows, in] times the int8 weights (the decode rows' kernel)."""
        if self.own_kernel:
            return int4_kernel.matmul_int8(flat, self.qweight, self.scale)
        return _int8_mm(flat, self.qweight, self.scale)


def _int8_mm(flat: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``flat`` [rows, in] times int8 weights with one scale per output channel."""
    return torch.ops.aten._weight_int8pack_mm(flat, qweight, scale)


def _int4_mm(flat: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor) -> torch.Tensor:
    """``flat`` [rows, in] times packed int4 weights (groups of :data:`INT4_GROUP`)."""
    return torch.ops.aten._weight_int4pack_mm_for_cpu(flat, packed, INT4_GROUP, scales_zeros)


#: Input channels per int4 group: a Q4_0 / Q4_1 GGUF block.
INT4_GROUP = 32


def four_bit_grid(weight: torch.Tensor) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``(q, step, low)`` when every group of :data:`INT4_GROUP` input channels of
    ``weight`` [out, in] holds only values ``low + step * q`` with ``q`` in 0..15, exactly
    in float32 (a 4-bit GGUF's weights de-quantized, as the bundled Q4_1 SmolLM2's are);
    None otherwise, and for a shape the kernel cannot pack (output channels not a multiple
    of 16). ``q``: int32 [out, in]; ``step``, ``low``: float32 [out, in / 32]."""
    out_features, in_features = weight.shape
    if in_features % INT4_GROUP or out_features % 16:
        return None
    q, step, low = nearest_four_bit_grid(weight)
    w = weight.detach().float().reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
    on_grid = q.reshape(w.shape).float() * step[..., None] + low[..., None]
    return (q, step, low) if torch.equal(on_grid, w) else None


def nearest_four_bit_grid(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, step, low)`` of the 4-bit grid each group of :data:`INT4_GROUP` input channels
    of ``weight`` [out, in] spans (its minimum to its maximum in 15 steps), each value
    rounded to its nearest point; shapes as :func:`four_bit_grid`'s."""
    out_features, in_features = weight.shape
    w = weight.detach().float().reshape(out_features, in_features // INT4_GROUP, INT4_GROUP)
    low, high = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    step = (high - low) / 15
    q = ((w - low) / step.clamp(min=torch.finfo(torch.float32).tiny)).round().clamp(0, 15)
    return q.reshape(out_features, in_features).to(torch.int32), step.squeeze(-1), low.squeeze(-1)


class Int4WeightLinear(QuantizedLinear):
    """A Linear layer held as 4-bit groups of :data:`INT4_GROUP` input channels, each with
    its own bf16 scale and offset: half the bytes a decode step reads of int8. Decode rows
    go through Troupe's int4 kernel (``int4_kernel``) where it builds and runs, else
    torch's (``_weight_int4pack_mm_for_cpu``); each buffer is in its kernel's layout. Built
    only from weights already on that grid (:func:`four_bit_grid`), so the only change
    to them is the scale and offset rounded to bf16 (Troupe's kernel rounds the decode
    rows' inputs by default; see ``int4_kernel``)."""

    packed: torch.Tensor
    scales_zeros: torch.Tensor
    #: Whether the weights are in Troupe's own kernel's layout (``int4_kernel``), else torch's.
    own_kernel: bool

    def __init__(self, linear: nn.Linear, grid: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                 act_dtype: torch.dtype) -> None:
        super().__init__()
        q, step, low = grid
        # Both kernels de-quantize (q - 8) * scale + zero, so zero is the group's middle.
        scale, zero = step.to(act_dtype), (low + 8 * step).to(act_dtype)
        self.own_kernel = act_dtype == torch.bfloat16 and int4_kernel.load() is not None
        #: How Troupe's kernel takes this layer's inputs (``int4_kernel.inputs``), fixed here.
        self.inputs = int4_kernel.inputs()
        if self.own_kernel:
            packed, scales_zeros = int4_kernel.pack(q, scale, zero)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            scales_zeros = torch.stack((scale, zero), -1).transpose(0, 1).contiguous()
        self.register_buffer("packed", packed)
        self.register_buffer("scales_zeros", scales_zeros)
        groups = q.reshape(q.shape[0], -1, INT4_GROUP).float() - 8
        self._keep(linear, (groups * scale.float()[..., None] + zero.float()[..., None]).reshape(q.shape),
                   act_dtype)

    def kernel(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` [rows, in] times the int4 weights (the decode rows' kernel)."""
        if self.own_kernel:
            return int4_kernel.matmul(flat, self.packed, self.scales_zeros, self.inputs)
        return _int4_mm(flat, self.packed, self.scales_zeros)


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``; without a call when it already is (a decode step makes hundreds)."""
    return x if x.dtype == dtype else x.to(dtype)


def matmul_rows(flat: torch.Tensor, kernel: Callable[[torch.Tensor], torch.Tensor],
                dense: torch.Tensor, out_features: int) -> torch.Tensor:
    """``flat`` [rows, in] times quantized weights: this step's prompt rows through
    ``dense`` (bf16), the others through ``kernel`` (the int8 or int4 weight-only matmul;
    see :func:`prompt_rows`)."""
    split = getattr(_step, "split", None)
    if split is None or split[0] != flat.shape[0]:
        return kernel(flat)
    if len(split[2]) == 0:  # every row is a prompt's
        return dense_rows(flat, dense)
    out = flat.new_empty(flat.shape[0], out_features)
    out[split[1]] = dense_rows(flat[split[1]], dense)
    out[split[2]] = kernel(flat[split[2]])
    return out


def dense_rows(flat: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``flat`` [rows, in] times ``dense`` [out, in] (bf16) in calls of the sizes
    :func:`dense_call_sizes` allows (zero rows pad the last), so every row's result is the
    one it gets alone or beside any other rows."""
    rows = flat.shape[0]
    calls = split_calls(rows, dense_call_sizes(dense))
    padded = sum(calls)
    if padded != rows:
        flat = torch.cat((flat, flat.new_zeros(padded - rows, flat.shape[1])))
    if len(calls) == 1:
        return torch.nn.functional.linear(flat, dense)[:rows]
    return torch.cat([torch.nn.functional.linear(chunk, dense)
                      for chunk in flat.split(calls)])[:rows]


def split_calls(rows: int, sizes: tuple[int, ...]) -> list[int]:
    """The call sizes for ``rows`` rows, from ``sizes`` (ascending): the largest while more
    rows are left than it holds, then the smallest that holds the rest."""
    calls, left = [], rows
    while left > sizes[-1]:
        calls.append(sizes[-1])
        left -= sizes[-1]
    if left > 0 or not calls:
        calls.append(next(size for size in sizes if size >= left))
    return calls


def dense_call_sizes(dense: torch.Tensor,
                     linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = torch.nn.functional.linear,
                     ) -> tuple[int, ...]:
    """The call sizes (ascending) that :func:`dense_rows` uses for ``dense``'s shape on this
    thread count: :data:`DENSE_ROWS`, and each of :data:`DENSE_SIZES` whose call gives
    every one of its rows (random, seeded) bit for bit what it gets in a
    :data:`DENSE_ROWS`-row call. A rounding difference comes from the kernel's blocking,
    which depends on shapes, not values, so random rows show it. Checked once per shape
    (and layout, dtype and thread count)."""
    key = (*dense.shape, *dense.stride(), dense.dtype, torch.get_num_threads())
    own = linear is torch.nn.functional.linear  # another (a test's) is checked, not kept
    sizes = _call_sizes.get(key) if own else None
    if sizes is None:
        generator = torch.Generator().manual_seed(17)
        probe = torch.randn(max(DENSE_SIZES, default=DENSE_ROWS), dense.shape[1], generator=generator)
        probe = probe.to(dense.dtype)
        with torch.inference_mode():
            reference = torch.cat([linear(chunk, dense) for chunk in probe.split(DENSE_ROWS)])
            sizes = (DENSE_ROWS, *(size for size in sorted(DENSE_SIZES)
                                   if torch.equal(linear(probe[:size], dense), reference[:size])))
        if own:
            _call_sizes[key] = sizes
    return sizes


class FusedGroup:
    """Sibling quantized layers that read the same input (q/k/v, gate/up) as one matmul.

    Decoding is bound by per-call cost as much as by bytes: one kernel call over the
    concatenated output channels replaces two or three, with the same result per channel
    (each output channel is its own dot product and scale), so outputs do not change. The
    members' buffers become slices of the fused ones (no extra memory; an int4 member keeps
    its own small scales, the kernel reads them whole). The members are all int8 or all
    int4 (whose packing is row-local in blocks of 64 output channels, so the members'
    packed weights concatenate as they are). The first member computes every member's
    columns and keeps them for the others, which take their slice when called with the
    very same input tensor and otherwise compute their own.
    """

    def __init__(self, members: list[QuantizedLinear]) -> None:
        self.lead = members[0]
        self.four_bit = isinstance(self.lead, Int4WeightLinear)
        #: Troupe's kernels: every buffer is in blocks of 16 output channels (dim 0).
        self.own_kernel = bool(getattr(self.lead, "own_kernel", False))
        self.inputs: str = getattr(self.lead, "inputs", "bf16")
        names = ("packed", "scales_zeros") if self.four_bit and self.own_kernel else ("packed",) \
            if self.four_bit else ("qweight", "scale")
        fused = {name: torch.cat([getattr(m, name) for m in members]).contiguous() for name in names}
        if self.four_bit and self.own_kernel:
            self.packed, self.scales_zeros = fused["packed"], fused["scales_zeros"]
        elif self.four_bit:
            self.packed = fused["packed"]
            self.scales_zeros = torch.cat([m.scales_zeros for m in members], dim=1).contiguous()  # type: ignore[misc]  # buffers
        else:
            self.qweight, self.scale = fused["qweight"], fused["scale"]
        self.dense = torch.cat([m.dense for m in members]).contiguous()
        self.width = int(self.dense.shape[0])
        self.columns: dict[int, tuple[int, int]] = {}
        start = 0
        for m in members:
            end = start + m.out_features
            self.columns[id(m)] = (start, end)
            rows = slice(start // 16, end // 16) if self.own_kernel else slice(start, end)
            for name, whole in fused.items():
                setattr(m, name, whole[rows])
            m.dense = self.dense[start:end]
            m.group = self
            start = end
        #: (input, prompt-row split, fused output) of the lead's last call, set in one
        #: assignment so a second thread (a prompt-logprobs forward) never mixes two calls.
        self._last: Optional[tuple[torch.Tensor, Any, torch.Tensor]] = None

    def kernel(self, flat: torch.Tensor) -> torch.Tensor:
        """``flat`` [rows, in] times every member's quantized weights, side by side."""
        if self.four_bit and self.own_kernel:
            return int4_kernel.matmul(flat, self.packed, self.scales_zeros, self.inputs)
        if self.four_bit:
            return _int4_mm(flat, self.packed, self.scales_zeros)
        if self.own_kernel:
            return int4_kernel.matmul_int8(flat, self.qweight, self.scale)
        return _int8_mm(flat, self.qweight, self.scale)

    def output(self, member: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
        """``member``'s output for ``x`` ([rows, out_features])."""
        split = getattr(_step, "split", None)
        start, end = self.columns[id(member)]
        last = self._last
        if member is not self.lead and last is not None and last[0] is x and last[1] is split:
            return last[2][:, start:end]
        flat = _as(x.reshape(-1, x.shape[-1]), member.act_dtype)
        if member is not self.lead:
            return member.matmul(flat)
        out = matmul_rows(flat, self.kernel, self.dense, self.width)
        self._last = (x, split, out)
        return out[:, start:end]


#: Sibling layers that read one input in Llama-style blocks (Llama, Mistral, Qwen2, SmolLM).
FUSABLE = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_siblings(model: nn.Module) -> int:
    """Group the quantized layers named in :data:`FUSABLE` under each module; returns how
    many groups. Layers with a bias, different input sizes or different kinds stay apart,
    and int4 layers whose output channels are not whole packing blocks (64)."""
    count = 0
    for module in model.modules():
        for names in FUSABLE:
            members = [m for n in names
                       if isinstance(m := getattr(module, n, None), (Int8WeightLinear, Int4WeightLinear))]
            if len(members) == len(names) and all(
                    type(m) is type(members[0]) and m.bias is None and m.group is None
                    and m.in_features == members[0].in_features
                    and (isinstance(m, Int8WeightLinear) or m.out_features % 64 == 0)
                    and getattr(m, "own_kernel", None) == getattr(members[0], "own_kernel", None)
                    and getattr(m, "inputs", None) == getattr(members[0], "inputs", None)
                    for m in members):
                FusedGroup(members)  # type: ignore[arg-type]  # checked just above
                count += 1
    return count


def quantize_linears(
    model: nn.Module, act_dtype: torch.dtype = torch.bfloat16, skip: tuple[str, ...] = (),
    four_bit: bool = False,
) -> int:
    """Replace every ``nn.Linear`` in ``model`` by an :class:`Int8WeightLinear` (with
    ``four_bit``, by an :class:`Int4WeightLinear` where its weights sit on a 4-bit grid);
    returns how many.

    Layers named in ``skip`` (e.g. ``lm_head``) keep their weights. A tied output head
    (``lm_head`` sharing the embedding) that is quantized gets its own copy; the
    embedding lookup keeps its full-precision table.
    """
    count = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and name not in skip:
                grid = four_bit_grid(child.weight) if four_bit else None
                setattr(module, name, Int8WeightLinear(child, act_dtype) if grid is None
                        else Int4WeightLinear(child, grid, act_dtype))
                count += 1
    return count


def load_causal_lm(folder: Path, weights: WeightsKind) -> Any:
    """Load a causal LM from a local folder in the requested weight format (eval mode).

    ``auto``: int4 for the layers whose weights already sit on a 4-bit grid (checked on the
    float32 weights, before any rounding), int8 for the rest; then the other parameters
    (embeddings, norms) in bf16, as with ``int8``."""
    from transformers import AutoModelForCausalLM

    dtype = torch.float32 if weights in ("float32", "auto") else torch.bfloat16
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True)
    if weights in ("int8", "auto"):
        quantize_linears(model, torch.bfloat16, four_bit=weights == "auto")
        fuse_siblings(model)
        nn.Module.to(model, torch.bfloat16)  # in place: what the quantized layers left in float32
    return model.eval()

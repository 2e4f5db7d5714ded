"""Ragged batches for a transformers causal LM: batched weights, attention per sequence.

A step packs the new tokens of every sequence (a whole prompt for a sequence joining, one
token for each one decoding) into a single row and runs it through the model once: the
Linear layers, which are nearly all the work, see one ``[tokens, hidden]`` matrix, while
attention runs per segment against that sequence's own key/value buffers: no padding, no
mask, so each sequence computes exactly what it computes alone (given row-independent
matmuls, which the int8 and bf16 kernels are; see ``weights``). This is registered as a
transformers attention implementation (``troupe_ragged``); the model's own cache is not
used (``use_cache=False``): the buffers travel in the ``troupe_kv`` keyword, which
transformers forwards to the attention function.

Decode segments (one new token) take a two-matmul attention instead of sdpa's CPU flash
kernel, whose set-up dominates a one-row query; transformers' own Llama (the bundled
SmolLM2) is stepped by ``llama_pass.LlamaPass``, its forward's operations in fewer
tensor calls. A one-token step on one core is bound by per-call costs nearly as much as by
reading the weights; ``bench/README.md`` has the measurements.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F

from deployments.engines.llama_pass import LlamaPass
from deployments.engines.weights import prompt_rows

__all__ = ["SeqKV", "RaggedModel", "ATTN_IMPL"]

ATTN_IMPL = "troupe_ragged"
_registered = False


class SeqKV:
    """One sequence's keys and values for every layer, in buffers that grow by doubling.

    Each layer's buffer is ``[2, kv_heads, capacity, dim]`` (keys, then values) float32
    whatever the activations' dtype: a decode step's attention reads every key and value
    in float32 (:func:`_attend_one`), and converting the whole history of every sequence
    and layer at each step cost a batch of 8 about half its step time. A bf16 value is
    exact in float32, so nothing changes numerically; a prompt's attention converts back
    (exactly) for sdpa. Keys and values share a buffer so that a decode token's pair is
    stored in one copy.
    """

    __slots__ = ("buffers", "lengths")

    def __init__(self, num_layers: int) -> None:
        self.buffers: list[Optional[torch.Tensor]] = [None] * num_layers
        self.lengths = [0] * num_layers

    @property
    def length(self) -> int:
        """Tokens held (the position of the next token)."""
        return self.lengths[-1]

    def fork(self, n: int) -> "SeqKV":
        """A private copy of the first ``n`` tokens (a cached prefix for a new sequence)."""
        copy = SeqKV(len(self.lengths))
        for layer, buf in enumerate(self.buffers):
            if buf is not None:
                copy.append(layer, buf[0, None, :, :n], buf[1, None, :, :n])
        return copy

    def _room(self, layer: int, t: int, like: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The layer's buffer, grown to hold ``t`` more tokens of ``like``'s ``[heads,
        dim]`` shape, and its length."""
        start = self.lengths[layer]
        buf = self.buffers[layer]
        if buf is None or start + t > buf.shape[2]:
            capacity = max(16, 2 * (start + t))
            grown = like.new_empty((2, like.shape[-2], capacity, like.shape[-1]), dtype=torch.float32)
            if buf is not None:
                grown[:, :, :start] = buf[:, :, :start]
            self.buffers[layer] = buf = grown
        return buf, start

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add ``[1, heads, t, dim]`` keys/values to ``layer``; returns all of that layer's
        (float32, ``[1, heads, n, dim]``)."""
        t = key.shape[2]
        buf, start = self._room(layer, t, key[0, :, 0])
        buf[0, :, start : start + t] = key[0]
        buf[1, :, start : start + t] = value[0]
        self.lengths[layer] = n = start + t
        return buf[0, None, :, :n], buf[1, None, :, :n]

    def push(self, layer: int, pair: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Add one token's float32 key and value (``[2, heads, dim]``) to ``layer``;
        returns all of that layer's keys and values (``[heads, n, dim]`` each). The decode
        path: as few tensor calls as can be (each costs a microsecond or two; a batch of
        8 makes 240 of these a step)."""
        buf, start = self._room(layer, 1, pair)
        buf.select(2, start).copy_(pair)
        self.lengths[layer] = start + 1
        return buf.narrow(2, 0, start + 1).unbind(0)


class Packed:
    """The sequences of one step packed into a single row: (kv, start, length) per segment."""

    __slots__ = ("segments", "masks")

    def __init__(self, kvs: Sequence[SeqKV], lengths: Sequence[int]) -> None:
        starts = [0]
        for n in lengths[:-1]:
            starts.append(starts[-1] + n)
        self.segments = list(zip(kvs, starts, lengths))
        #: (new tokens, all tokens) -> a prompt's causal mask after its cached prefix, made
        #: once a step, not once a layer.
        self.masks: dict[tuple[int, int], torch.Tensor] = {}

    def attend(self, layer: int, query: torch.Tensor, queries: torch.Tensor, pairs: torch.Tensor,
               scale: float) -> torch.Tensor:
        """One layer's attention of every segment (``llama_pass.Attend``)."""
        return _attend_packed(self, layer, query, queries, pairs, scale)


def _ragged_attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    troupe_kv: Optional[Packed] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of each packed segment against its own sequence's buffers (causal within
    its new tokens). Without ``troupe_kv`` (a plain forward or ``generate``) it is sdpa."""
    if troupe_kv is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    dim = query.shape[3]
    scale = scaling if scaling is not None else dim ** -0.5
    # Every token's heads side by side ([tokens, heads, dim]), as the projections made them:
    # one conversion to float32 for all queries, keys and values and one back for all
    # outputs, not one per sequence (per-call costs dominate a decode step's attention).
    queries = query[0].transpose(0, 1).float()
    new_pairs = torch.stack((key[0].transpose(0, 1), value[0].transpose(0, 1)), dim=1).float()
    out = _attend_packed(troupe_kv, module.layer_idx, query, queries, new_pairs, scale)
    return out.to(query.dtype).unsqueeze(0), None


def _attend_packed(packed: Packed, layer: int, query: torch.Tensor, queries: torch.Tensor,
                   new_pairs: torch.Tensor, scale: float) -> torch.Tensor:
    """Each segment's attention against its own sequence's buffers; float32 ``[tokens,
    heads, dim]`` out. ``query``: the ``[1, heads, tokens, dim]`` queries in the
    activations' dtype (a prompt's sdpa); ``queries``: the same as float32 ``[tokens,
    heads, dim]`` (scaled in place when it is not ``query``'s own storage);
    ``new_pairs``: each token's float32 key and value, ``[tokens, 2, kv_heads, dim]``.
    """
    tokens, heads, dim = queries.shape
    kv_heads = new_pairs.shape[2]
    decode_scale = scale
    if math.frexp(scale)[0] == 0.5:
        # A power of two (1/8 for 64-wide heads) scales the queries exactly, once for
        # every sequence, instead of each sequence's scores: the same scores, bit for bit.
        # (in place only on a copy: float32 activations' queries are ``query`` itself)
        queries = queries.mul(scale) if query.dtype == torch.float32 else queries.mul_(scale)
        decode_scale = 1.0
    # Query heads grouped over their key/value head (GQA), as :func:`_attend_one` reads them
    grouped = (tokens, kv_heads, heads // kv_heads, dim)
    out = queries.new_empty(grouped)
    rows_q: Any = queries.view(grouped)  # a tensor (a select per row) or its rows
    rows_out: Any = out
    rows_kv: Any = new_pairs
    if tokens == len(packed.segments):  # one token each: every row's views in one call each
        rows_q, rows_out, rows_kv = rows_q.unbind(0), out.unbind(0), new_pairs.unbind(0)
    for kv, start, t in packed.segments:
        if t == 1:
            keys, values = kv.push(layer, rows_kv[start])
            _attend_one(rows_q[start], keys, values, decode_scale, rows_out[start])
            continue
        end = start + t
        pairs = new_pairs[start:end].transpose(0, 2)  # [kv_heads, 2, t, dim]
        keys, values = kv.append(layer, pairs[:, 0][None], pairs[:, 1][None])
        n = keys.shape[2]
        mask = None
        if 1 < t < n:  # new tokens after a cached prefix: causal, shifted by the prefix
            mask = packed.masks.get((t, n))
            if mask is None:
                mask = packed.masks[(t, n)] = torch.ones(t, n, dtype=torch.bool).tril(n - t)
        out[start:end] = F.scaled_dot_product_attention(
            query[:, :, start:end], keys.to(query.dtype), values.to(query.dtype), attn_mask=mask,
            is_causal=(t > 1 and t == n), scale=scale, enable_gqa=True,
        )[0].transpose(0, 1).view(t, *grouped[1:])  # bf16 in float32 and back: exact
    return out.view(tokens, heads, dim)


def _attend_one(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
                out: torch.Tensor) -> None:
    """One new token's attention over its sequence's float32 ``[kv_heads, n, dim]`` keys
    and values: ``query`` float32 ``[kv_heads, heads / kv_heads, dim]`` (query heads
    grouped over their key/value head, GQA, instead of repeating the keys) into ``out``
    (the same shape).

    sdpa's CPU flash kernel costs about 60 us a call whatever the size (its blocking
    set-up), a third of a decode step's attention; two float32 matmuls and a softmax do a
    one-row query in a fraction of that. Float32 throughout, as the flash kernel
    accumulates. ``scale`` 1.0: the query is already scaled.
    """
    # bmm, as matmul copies the keys' strided (transposed) view
    scores = torch.bmm(query, keys.transpose(1, 2))
    if scale != 1.0:
        scores.mul_(scale)
    torch.bmm(torch.softmax(scores, dim=-1), values, out=out)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def register() -> None:
    """Make ``troupe_ragged`` known to transformers (attention and mask interfaces)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPL, _ragged_attention)
    AttentionMaskInterface.register(ATTN_IMPL, _no_mask)
    _registered = True


class RaggedModel:
    """Prefill and decode steps of a causal LM over per-sequence :class:`SeqKV` buffers."""

    def __init__(self, model: Any) -> None:
        register()
        model.config._attn_implementation = ATTN_IMPL
        self.model = model
        self.num_layers = int(model.config.num_hidden_layers)
        #: LoRA adapters on this model (a ``lora_peft.PeftAdapters``; issue 19), or None.
        self.lora: Any = None
        #: Steps of the base model skip transformers' module plumbing (``llama_pass``).
        self.plain_llama = LlamaPass.fits(model)
        self._pass = LlamaPass(model) if self.plain_llama else None

    def new_kv(self) -> SeqKV:
        return SeqKV(self.num_layers)

    def step(self, kvs: Sequence[SeqKV], chunks: Sequence[Sequence[int]],
             adapters: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
        """New tokens of several sequences (a prompt, or one decode token each) in one
        forward pass; the next-token logits of each sequence, [len(chunks), V].

        Once LoRA adapters are loaded, the step runs one pass per adapter among its
        sequences (``adapters``; None: the base model): a packed step is a single batch
        row, and peft chooses adapters per row.
        """
        if self.lora is None or self.lora.peft is None:
            return self._forward(self.model, {}, kvs, chunks)
        names = list(adapters) if adapters is not None else [None] * len(chunks)
        rows: list[Optional[torch.Tensor]] = [None] * len(chunks)
        for name in dict.fromkeys(names):  # in order of first appearance
            picked = [i for i, n in enumerate(names) if n == name]
            model, kwargs = self.lora.generate_target([name])
            logits = self._forward(model, kwargs, [kvs[i] for i in picked],
                                   [chunks[i] for i in picked])
            for i, row in zip(picked, logits, strict=True):
                rows[i] = row
        return torch.stack(rows)  # type: ignore[arg-type]  # every row was filled

    def _forward(self, model: Any, kwargs: dict[str, Any], kvs: Sequence[SeqKV],
                 chunks: Sequence[Sequence[int]]) -> torch.Tensor:
        lengths = [len(c) for c in chunks]
        input_ids = torch.tensor([[t for c in chunks for t in c]], dtype=torch.long)
        # Plain lists into one tensor each: arange/repeat_interleave per step cost ~0.7 ms
        positions = torch.tensor([[p for kv, n in zip(kvs, lengths) for p in range(kv.length, kv.length + n)]],
                                 dtype=torch.long)
        last = torch.tensor(lengths, dtype=torch.long).cumsum(0) - 1
        is_prompt = torch.tensor([n > 1 for n in lengths for _ in range(n)])
        packed = Packed(kvs, lengths)
        with torch.inference_mode(), prompt_rows(is_prompt):
            if model is self.model and self.plain_llama and self._pass is not None and not kwargs:
                return self._pass(input_ids, positions, last, packed.attend).float()
            out = model(
                input_ids=input_ids, position_ids=positions, use_cache=False,
                logits_to_keep=last, troupe_kv=packed, **kwargs,
            )
        return out.logits[0].float()

    def prefill(self, kv: SeqKV, ids: Sequence[int]) -> torch.Tensor:
        """Run a prompt (or the uncached rest of one) through; logits of its last token, [V]."""
        return self.step([kv], [ids])[0]

    def decode(self, kvs: Sequence[SeqKV], tokens: Sequence[int]) -> torch.Tensor:
        """One token per sequence, all in one pass; next-token logits, [B, V]."""
        return self.step(kvs, [[t] for t in tokens])

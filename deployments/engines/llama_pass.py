"""A packed step through transformers' Llama (SmolLM2's architecture) in few tensor calls.

A one-token decode step on one core pays about as much per tensor call (a microsecond or
two each) as for reading the weights, so :class:`LlamaPass` runs the model's forward with
the same arithmetic in the same order (the same logits, bit for bit) but without its
per-module plumbing (hooks, keyword routing, output records, ``nn.Module`` attribute
look-ups, looked up once here) and with fewer calls per layer: one projection of
q/k/v and of gate/up (one int8 matmul each when ``weights.fuse_siblings`` grouped them),
queries and keys rotated together and written back in place, one float32 conversion for
the attention, and every token's heads side by side (``[tokens, heads, dim]``), the
layout the ragged attention reads. Measurements: ``bench/README.md``.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

from deployments.engines.weights import QuantizedLinear, matmul_rows

__all__ = ["LlamaPass", "Attend"]

#: ``attend(layer, query, queries, pairs, scale)``: the ragged attention of one layer
#: (``ragged._attend_packed`` over a step's segments). ``query``: ``[1, heads, tokens,
#: dim]`` in the activations' dtype; ``queries``: the same in float32, ``[tokens, heads,
#: dim]``; ``pairs``: each token's float32 key and value, ``[tokens, 2, kv_heads, dim]``.
#: Returns float32 ``[tokens, heads, dim]``.
Attend = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


class _Layer(NamedTuple):
    """One decoder layer's weights and calls, looked up once."""

    number: int  # layer_idx
    norm_in: tuple[torch.Tensor, float]
    qkv: Callable[[torch.Tensor], torch.Tensor]
    scaling: float
    o: Callable[[torch.Tensor], torch.Tensor]
    norm_post: tuple[torch.Tensor, float]
    gate_up: Callable[[torch.Tensor], torch.Tensor]
    act: Callable[[torch.Tensor], torch.Tensor]
    down: Callable[[torch.Tensor], torch.Tensor]


class LlamaPass:
    """Packed steps through one Llama model (see the module docstring).

    Built once per model: its layers' weights are looked up here, so the model's modules
    must not be swapped afterwards (LoRA adapters run through the model's own forward).
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        inner, config = model.model, model.config
        self.heads, self.kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
        self.layers = [_plan(layer) for layer in list(inner.layers)[: config.num_hidden_layers]]
        self.norm = _norm(inner.norm)

    @staticmethod
    def fits(model: Any) -> bool:
        """Whether ``model`` is transformers' own Llama, layer for layer, so the pass
        computes exactly what its forward computes."""
        from transformers.models.llama import modeling_llama as llama

        inner = getattr(model, "model", None)
        return (type(model) is llama.LlamaForCausalLM and type(inner) is llama.LlamaModel
                and type(inner.norm) is llama.LlamaRMSNorm
                and all(type(layer) is llama.LlamaDecoderLayer and type(layer.self_attn) is llama.LlamaAttention
                        and type(layer.mlp) is llama.LlamaMLP and type(layer.input_layernorm) is llama.LlamaRMSNorm
                        and type(layer.post_attention_layernorm) is llama.LlamaRMSNorm
                        for layer in inner.layers))

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, last: torch.Tensor,
                 attend: Attend) -> torch.Tensor:
        """``[1, tokens]`` ids at ``positions``; logits of the ``last`` rows, ``[len(last), V]``."""
        inner = self.model.model
        hidden = inner.embed_tokens(input_ids)
        cos, sin = inner.rotary_emb(hidden, positions)
        hidden, cos, sin = hidden[0], cos[0].unsqueeze(1), sin[0].unsqueeze(1)  # cos: [tokens, 1, dim]
        tokens, dim, half = hidden.shape[0], cos.shape[-1], cos.shape[-1] // 2
        # rotate_half(x) * sin == swap_halves(x) * [-sin_1, sin_2]: a sign moved between
        # the factors of a product, exact in IEEE arithmetic; one flip replaces neg + cat.
        sin = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        heads, rotated = self.heads, self.heads + self.kv_heads
        swapped = (tokens, rotated, 2, half)
        for layer in self.layers:
            x = _rms_norm(layer.norm_in, hidden)
            qkv = layer.qkv(x).view(tokens, -1, dim)
            qk = qkv[:, :rotated]
            torch.add(qk * cos, qk.view(swapped).flip(2).view(qk.shape) * sin, out=qk)
            wide = qkv.float()  # one conversion: queries, keys, values
            out = attend(layer.number, qkv[:, :heads].transpose(0, 1)[None], wide[:, :heads],
                         wide[:, heads:].view(tokens, 2, self.kv_heads, dim), layer.scaling)
            hidden = hidden + layer.o(out.to(hidden.dtype).view(tokens, -1))
            x = _rms_norm(layer.norm_post, hidden)
            gate_up = layer.gate_up(x)
            width = gate_up.shape[-1] // 2
            hidden = hidden + layer.down(layer.act(gate_up[:, :width]) * gate_up[:, width:])
        return self.model.lm_head(_rms_norm(self.norm, hidden)[last])


def _rms_norm(norm: tuple[torch.Tensor, float], hidden: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm.forward``: aten's ``rms_norm`` is the same operations in one call."""
    weight, eps = norm
    return weight * torch.rms_norm(hidden.float(), (hidden.shape[-1],), None, eps).to(hidden.dtype)


def _norm(module: Any) -> tuple[torch.Tensor, float]:
    return module.weight, float(module.variance_epsilon)


def _plan(layer: Any) -> _Layer:
    attn, mlp = layer.self_attn, layer.mlp
    return _Layer(
        number=int(attn.layer_idx), norm_in=_norm(layer.input_layernorm),
        qkv=_projection(attn.q_proj, attn.k_proj, attn.v_proj), scaling=float(attn.scaling),
        o=_projection(attn.o_proj), norm_post=_norm(layer.post_attention_layernorm),
        gate_up=_projection(mlp.gate_proj, mlp.up_proj), act=mlp.act_fn.forward,
        down=_projection(mlp.down_proj),
    )


def _projection(*members: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """``[tokens, in]`` through sibling Linear layers, their outputs side by side: one
    quantized matmul when they are exactly one fused group (in this order)."""
    first = members[0]
    group = getattr(first, "group", None)
    if (group is not None and group.lead is first and len(group.columns) == len(members)
            and [group.columns.get(id(m)) for m in members] == sorted(group.columns.values())):
        kernel, dense, width = group.kernel, group.dense, group.width
        return lambda x: matmul_rows(x, kernel, dense, width)
    if all(isinstance(m, QuantizedLinear) and m.bias is None and m.group is None for m in members):
        if len(members) == 1:
            return lambda x: first.matmul(x) if x.dtype == first.act_dtype else first(x)
        return lambda x: torch.cat([m.matmul(x) if x.dtype == m.act_dtype else m(x) for m in members], dim=-1)
    if len(members) == 1:
        return first
    return lambda x: torch.cat([m(x) for m in members], dim=-1)

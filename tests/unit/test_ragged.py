"""The ragged step model on a tiny randomly initialised Llama (no weights on disk).

It must compute what transformers' own forward computes, and a sequence's logits must not
depend on which other sequences share its batch (so batching changes no output).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from deployments.engines.ragged import RaggedModel  # noqa: E402
from deployments.engines.weights import Int8WeightLinear, dense_rows, prompt_rows, quantize_linears  # noqa: E402


def tiny_llama(weights: str = "float32"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    if weights == "int4":  # every layer's weights on a 4-bit grid, as a Q4_1 GGUF's are
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(on_four_bit_grid(module.weight.shape))
        assert quantize_linears(model, four_bit=True) == 2 * 7 + 1
        return model.to(torch.bfloat16)
    if weights != "float32":
        model = model.to(torch.bfloat16)
    if weights == "int8":
        assert quantize_linears(model) == 2 * 7 + 1  # q k v o gate up down per layer, lm_head
    return model


def on_four_bit_grid(shape, scale=0.02):
    """Random float32 weights of ``shape`` whose groups of 32 input channels each hold
    values low + step * q, q in 0..15 (using both ends), like a Q4_1 GGUF's de-quantized."""
    out_features, in_features = shape
    q = torch.randint(0, 16, (out_features, in_features // 32, 32)).float()
    q[..., 0], q[..., 1] = 0, 15
    # a GGUF block's step and low are float16: their products and sums are exact in float32
    step = (torch.rand(out_features, in_features // 32, 1) * scale / 8 + 1e-4).half().float()
    low = (-8 * step + torch.randn(out_features, in_features // 32, 1) * scale / 10).half().float()
    return (q * step + low).reshape(shape)


def reference_greedy(model, ids, n):
    seq = list(ids)
    with torch.inference_mode():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
            seq.append(int(logits.argmax()))
    return seq[len(ids):]


PROMPTS = [[5, 6, 7, 8, 9], [11, 12], [20, 21, 22, 23, 24, 25, 26, 27, 28], [3]]


def ragged_greedy(stepper, prompts, n):
    kvs = [stepper.new_kv() for _ in prompts]
    outs = [[int(stepper.prefill(kv, p).argmax())] for kv, p in zip(kvs, prompts)]
    for _ in range(n - 1):
        logits = stepper.decode(kvs, [o[-1] for o in outs])
        for o, row in zip(outs, logits):
            o.append(int(row.argmax()))
    return outs


def test_ragged_matches_the_plain_forward():
    model = tiny_llama()
    want = [reference_greedy(model, p, 6) for p in PROMPTS]
    stepper = RaggedModel(model)
    assert ragged_greedy(stepper, PROMPTS, 6) == want
    # The same model still serves plain forwards and generate() (sdpa without troupe_kv).
    assert [reference_greedy(model, p, 6) for p in PROMPTS] == want


# float32 is not batch-invariant on CPU (a one-row matmul takes another kernel than a
# batched one, so roundings differ); int8 is (weights.py), and so is bfloat16 here, where
# each call stays under oneDNN's 33 rows (a CPU with AMX blocks rows by 32).
@pytest.mark.parametrize("weights", ["int8", "int4", "bfloat16"])
def test_logits_do_not_depend_on_the_batch(weights):
    stepper = RaggedModel(tiny_llama(weights))
    alone = []
    for p in PROMPTS:
        kv = stepper.new_kv()
        stepper.prefill(kv, p)
        alone.append(stepper.decode([kv], [1])[0])
    kvs = [stepper.new_kv() for _ in PROMPTS]
    for kv, p in zip(kvs, PROMPTS):
        stepper.prefill(kv, p)
    together = stepper.decode(kvs, [1] * len(PROMPTS))
    for row, single in zip(together, alone):
        assert torch.equal(row, single)


def test_kv_buffers_grow_and_prefix_prefill_continues():
    model = tiny_llama()
    stepper = RaggedModel(model)
    whole = stepper.prefill(stepper.new_kv(), PROMPTS[2])
    kv = stepper.new_kv()
    stepper.prefill(kv, PROMPTS[2][:4])
    rest = stepper.prefill(kv, PROMPTS[2][4:])  # the uncached rest of a prompt, causal
    assert kv.length == len(PROMPTS[2])
    assert torch.allclose(whole, rest, atol=1e-5)


def test_int8_linear_is_close_to_the_float_layer():
    torch.manual_seed(1)
    linear = torch.nn.Linear(64, 32, bias=True)
    q = Int8WeightLinear(linear, torch.bfloat16)
    x = torch.randn(3, 64)
    assert q(x).dtype == x.dtype
    assert torch.allclose(q(x), linear(x), atol=0.1, rtol=0.05)


@pytest.mark.parametrize("weights", ["int8", "int4", "bfloat16"])
def test_prompts_joining_a_decoding_batch_change_nothing(weights):
    """One pass packing two prompts with two decoding sequences equals each alone."""
    stepper = RaggedModel(tiny_llama(weights))
    alone = ragged_greedy(stepper, PROMPTS, 4)
    kvs = [stepper.new_kv() for _ in PROMPTS]
    outs = [[int(stepper.prefill(kvs[i], PROMPTS[i]).argmax())] for i in (0, 1)] + [[], []]
    logits = stepper.step(kvs, [outs[0][-1:], outs[1][-1:], PROMPTS[2], PROMPTS[3]])
    for out, row in zip(outs, logits):
        out.append(int(row.argmax()))
    for _ in range(3):
        logits = stepper.step(kvs, [o[-1:] for o in outs])
        for out, row in zip(outs, logits):
            out.append(int(row.argmax()))
    assert outs[0][:4] == alone[0] and outs[1][:4] == alone[1]
    assert outs[2][:4] == alone[2] and outs[3][:4] == alone[3]


def test_prompt_rows_take_the_bf16_copy_and_decode_rows_the_int8_kernel():
    torch.manual_seed(1)
    layer = Int8WeightLinear(torch.nn.Linear(64, 48, bias=False), torch.bfloat16)
    x = torch.randn(7, 64).to(torch.bfloat16)
    is_prompt = torch.tensor([True, True, True, False, True, True, False])
    with prompt_rows(is_prompt):
        mixed = layer(x)
        head = layer(x[:2])  # another row count (the output head's rows): int8 for all
    alone_int8 = layer(x)
    for row in range(7):
        expected = layer(x[row:row + 1]) if not is_prompt[row] else dense_rows(
            x[row:row + 1], layer.dense)
        assert torch.equal(mixed[row:row + 1], expected)
    assert torch.equal(head, alone_int8[:2])
    # both paths hold the same de-quantized weights: close, not necessarily bit-equal
    assert torch.allclose(mixed.float(), alone_int8.float(), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("weights, groups", [("int8", 2 * 2), ("int4", 2)])
def test_fused_siblings_change_no_output(weights, groups):
    """q/k/v and gate/up as one int8 matmul give exactly what the separate layers give,
    for decode rows (int8 kernel) and prompt rows (bf16 copy) alike; int4 likewise, where
    the outputs are whole packing blocks (this model's k/v are 32 wide: gate/up only)."""
    from deployments.engines.weights import fuse_siblings

    plain, fused = RaggedModel(tiny_llama(weights)), RaggedModel(tiny_llama(weights))
    assert fuse_siblings(fused.model) == groups
    greedy = {name: ragged_greedy(s, PROMPTS, 5) for name, s in (("plain", plain), ("fused", fused))}
    prompts = {name: s.step([s.new_kv() for _ in PROMPTS], PROMPTS)
               for name, s in (("plain", plain), ("fused", fused))}
    assert greedy["fused"] == greedy["plain"]
    assert torch.equal(prompts["fused"], prompts["plain"])


def _one_token_attention(query, keys, values, scale):
    """The decode attention (``_attend_one``) for a ``[1, heads, 1, dim]`` query and
    ``[1, kv_heads, n, dim]`` keys and values, in the query's dtype."""
    from deployments.engines.ragged import _attend_one

    heads, kv_heads, dim = query.shape[1], keys.shape[1], query.shape[3]
    out = torch.empty(kv_heads, heads // kv_heads, dim)
    _attend_one(query.reshape(out.shape).float(), keys[0].float(), values[0].float(), scale, out)
    return out.to(query.dtype).reshape(1, heads, 1, dim)


def test_float32_buffers_hold_bf16_keys_exactly():
    """The buffers are float32 for the decode attention; a prompt's attention reads them
    back as bf16 and gets the very keys it stored."""
    from deployments.engines.ragged import SeqKV

    torch.manual_seed(3)
    kv = SeqKV(1)
    k, v = torch.randn(1, 3, 20, 64).bfloat16(), torch.randn(1, 3, 20, 64).bfloat16()
    keys, values = kv.append(0, k, v)
    assert keys.dtype == torch.float32
    assert torch.equal(keys.to(torch.bfloat16), k) and torch.equal(values.to(torch.bfloat16), v)
    q = torch.randn(1, 9, 1, 64).bfloat16()
    assert torch.equal(_one_token_attention(q, keys, values, 0.125), _one_token_attention(q, k, v, 0.125))


def test_one_token_attention_is_close_to_sdpa():
    import torch.nn.functional as F

    torch.manual_seed(2)
    for n in (1, 7, 130):
        q = torch.randn(1, 9, 1, 64).bfloat16()
        k, v = torch.randn(1, 3, n, 64).bfloat16(), torch.randn(1, 3, n, 64).bfloat16()
        want = F.scaled_dot_product_attention(q, k, v, scale=0.125, enable_gqa=True)
        got = _one_token_attention(q, k, v, 0.125)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=0)


@pytest.mark.parametrize("weights", ["int8", "int8-unfused", "int4", "bfloat16", "float32"])
def test_the_lean_llama_pass_computes_what_transformers_computes(weights):
    """The step's own pass through a Llama gives transformers' logits bit for bit (with
    q/k/v and gate/up fused into one int8 matmul each, or each layer on its own)."""
    from deployments.engines.weights import fuse_siblings

    model = tiny_llama(weights.removesuffix("-unfused"))
    if weights == "int8":
        fuse_siblings(model)
    lean, plain = RaggedModel(model), RaggedModel(model)
    assert lean.plain_llama
    plain.plain_llama = False
    logits = {}
    for name, stepper in (("lean", lean), ("plain", plain)):
        kvs = [stepper.new_kv() for _ in PROMPTS]
        first = stepper.step(kvs[:2], PROMPTS[:2])
        mixed = stepper.step(kvs, [[1], [2], *PROMPTS[2:]])  # decode rows beside prompts
        logits[name] = (first, mixed, stepper.decode(kvs, [3, 4, 5, 6]))
    for got, want in zip(logits["lean"], logits["plain"]):
        assert torch.equal(got, want)


def test_decode_keys_pushed_one_at_a_time_equal_appended_ones():
    """The decode path's ``push`` keeps what a prompt's ``append`` keeps, past regrowth."""
    from deployments.engines.ragged import SeqKV

    torch.manual_seed(4)
    k, v = torch.randn(1, 3, 40, 8).bfloat16(), torch.randn(1, 3, 40, 8).bfloat16()
    whole, stepped = SeqKV(1), SeqKV(1)
    want_k, want_v = whole.append(0, k, v)
    stepped.append(0, k[:, :, :5], v[:, :, :5])
    for i in range(5, 40):
        got_k, got_v = stepped.push(0, torch.stack((k[0, :, i], v[0, :, i])).float())
    assert stepped.length == whole.length == 40
    assert torch.equal(got_k, want_k[0]) and torch.equal(got_v, want_v[0])
    assert torch.equal(stepped.fork(30).buffers[0][0, :, :30], want_k[0, :, :30])


def test_a_power_of_two_scale_on_the_queries_gives_the_same_attention_bit_for_bit():
    """Decode steps scale the queries once (1/8 for 64-wide heads) instead of every
    sequence's scores: exact for a power of two, so outputs do not change."""
    from deployments.engines.ragged import _attend_one

    torch.manual_seed(5)
    for n in (1, 9, 70):
        q = torch.randn(3, 3, 64).bfloat16().float()  # 9 query heads over 3 key/value heads
        k, v = torch.randn(3, n, 64).bfloat16().float(), torch.randn(3, n, 64).bfloat16().float()
        folded, plain = torch.empty(3, 3, 64), torch.empty(3, 3, 64)
        _attend_one(q * 0.125, k, v, 1.0, folded)
        _attend_one(q, k, v, 0.125, plain)
        assert torch.equal(folded, plain)


def test_a_scale_that_is_no_power_of_two_still_changes_nothing_in_a_batch():
    """24-wide heads (scale 1/sqrt(24)) take the per-sequence scaling; batch-invariant too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=97, hidden_size=96, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval().to(torch.bfloat16)
    quantize_linears(model)
    stepper = RaggedModel(model)
    together = ragged_greedy(stepper, PROMPTS, 6)
    assert together == [ragged_greedy(stepper, [p], 6)[0] for p in PROMPTS]

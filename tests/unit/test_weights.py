"""The int8 engine's matmuls give each row the result it gets alone (batching changes no
output), on any CPU: the bf16 prompt path runs in fixed-size calls (``weights.dense_rows``)."""

from __future__ import annotations

import pytest
import torch

from deployments.engines.weights import (
    DENSE_ROWS,
    DENSE_SIZES,
    Int4WeightLinear,
    Int8WeightLinear,
    dense_call_sizes,
    dense_rows,
    four_bit_grid,
    prompt_rows,
    quantize_linears,
    split_calls,
)

# SmolLM2's projections (fused q/k/v, fused gate/up, down) and its output head: on an AMX
# CPU a plain 33-row bf16 matmul of the last three rounds some rows unlike one row alone.
SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_rows_gives_each_row_what_it_gets_alone(shape):
    torch.set_num_threads(1)
    torch.manual_seed(3)
    dense = torch.randn(*shape).bfloat16()
    x = torch.randn(300, shape[1]).bfloat16()
    alone = torch.cat([dense_rows(x[i:i + 1], dense) for i in range(0, 300, 7)])
    # every call size there is (64, 128, 256 where this CPU agrees) and two calls
    for rows in (1, 20, DENSE_ROWS, DENSE_ROWS + 1, 150, 256, 300):
        got = dense_rows(x[:rows], dense)
        assert got.shape == (rows, shape[0])
        assert torch.equal(got[::7], alone[: len(got[::7])]), rows
    # the same rows behind other rows (another sequence's prompt packed first)
    shifted = dense_rows(torch.cat((torch.randn(45, shape[1]).bfloat16(), x)), dense)[45:]
    assert torch.equal(shifted[::7], alone)


def test_split_calls_takes_the_largest_size_then_the_smallest_that_holds_the_rest():
    sizes = (64, 128, 256)
    assert split_calls(1, sizes) == [64]
    assert split_calls(64, sizes) == [64]
    assert split_calls(65, sizes) == [128]
    assert split_calls(129, sizes) == [256]
    assert split_calls(256, sizes) == [256]
    assert split_calls(300, sizes) == [256, 64]
    assert split_calls(600, sizes) == [256, 256, 128]
    assert split_calls(130, (64,)) == [64, 64, 64]


def test_a_call_size_that_rounds_rows_differently_is_not_used():
    # A kernel whose calls of more than 128 rows round unlike 64-row calls (as oneDNN's
    # bf16 matmul does for some shapes at 192 or 384 rows on AMX) loses 256; one that
    # rounds every call of another size differently keeps only 64-row calls.
    def over_128(x, w):
        out = torch.nn.functional.linear(x, w)
        return out + 1 if x.shape[0] > 128 else out

    def not_64(x, w):
        out = torch.nn.functional.linear(x, w)
        return out if x.shape[0] == DENSE_ROWS else out * 2

    torch.manual_seed(5)
    dense = torch.randn(192, 64).bfloat16()
    found = dense_call_sizes(dense)  # the real kernel's finding, kept for this shape
    assert found[0] == DENSE_ROWS and set(found[1:]) <= set(DENSE_SIZES)
    assert DENSE_SIZES == (128, 256)
    assert dense_call_sizes(dense, over_128) == (64, 128)
    assert dense_call_sizes(dense, not_64) == (DENSE_ROWS,)
    # a fake kernel's finding is not kept: dense_rows still uses the real one's
    assert dense_call_sizes(dense) == found


def test_dense_rows_is_the_plain_matmul_up_to_rounding():
    torch.manual_seed(4)
    dense, x = torch.randn(96, 64).bfloat16(), torch.randn(130, 64).bfloat16()
    assert torch.allclose(dense_rows(x, dense).float(), (x.float() @ dense.float().T), atol=0.5, rtol=0.02)


def test_a_step_with_many_prompt_rows_still_matches_each_prompt_alone():
    """Prompt rows of several sequences (70 in all) around decode rows: each row as
    in a step of its own sequence."""
    torch.manual_seed(5)
    layer = Int8WeightLinear(torch.nn.Linear(576, 3072, bias=False), torch.bfloat16)
    first, second, decode = (torch.randn(n, 576).bfloat16() for n in (20, 50, 3))
    x = torch.cat((first, decode, second))
    is_prompt = torch.tensor([True] * 20 + [False] * 3 + [True] * 50)
    with prompt_rows(is_prompt):
        packed = layer(x)
    with prompt_rows(torch.ones(20, dtype=torch.bool)):
        first_alone = layer(first)
    with prompt_rows(torch.ones(50, dtype=torch.bool)):
        second_alone = layer(second)
    assert torch.equal(packed[:20], first_alone) and torch.equal(packed[23:], second_alone)
    assert torch.equal(packed[20:23], torch.cat([layer(decode[i:i + 1]) for i in range(3)]))


def test_four_bit_grid_finds_a_q4_1_layer_and_nothing_else():
    from tests.unit.test_ragged import on_four_bit_grid

    torch.manual_seed(6)
    weight = on_four_bit_grid((48, 96))
    q, step, low = four_bit_grid(weight)
    assert q.dtype == torch.int32 and int(q.min()) == 0 and int(q.max()) == 15
    assert torch.equal((q.reshape(48, 3, 32).float() * step[..., None] + low[..., None]).reshape(48, 96), weight)
    assert four_bit_grid(torch.randn(48, 96)) is None  # ordinary weights: int8 instead
    assert four_bit_grid(on_four_bit_grid((48, 96))[:, :80]) is None  # not whole groups
    off = weight.clone()
    off[3, 40] += 1e-6  # one value off the grid
    assert four_bit_grid(off) is None


def test_int4_layers_hold_the_grid_and_keep_rows_independent():
    from tests.unit.test_ragged import on_four_bit_grid

    torch.manual_seed(7)
    linear = torch.nn.Linear(576, 960, bias=False)
    with torch.no_grad():
        linear.weight.copy_(on_four_bit_grid((960, 576)))
    layer = Int4WeightLinear(linear, four_bit_grid(linear.weight), torch.bfloat16)
    # the bf16 copy for prompt rows is the grid, up to the scales' rounding to bf16
    assert torch.allclose(layer.dense.float(), linear.weight, atol=2e-4, rtol=0)
    x = torch.randn(8, 576).bfloat16()
    decode = layer(x)
    assert torch.allclose(decode.float(), x.float() @ linear.weight.T, atol=0.05, rtol=0.02)
    assert torch.equal(decode, torch.cat([layer(x[i:i + 1]) for i in range(8)]))
    is_prompt = torch.tensor([True, True, False, True, False, False, True, True])
    with prompt_rows(is_prompt):
        mixed = layer(x)
    assert torch.equal(mixed[~is_prompt], decode[~is_prompt])
    assert torch.equal(mixed[is_prompt], dense_rows(x[is_prompt], layer.dense))


def test_quantize_four_bit_takes_int4_only_where_the_grid_is_exact():
    from tests.unit.test_ragged import on_four_bit_grid

    torch.manual_seed(8)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 16, bias=False))
    with torch.no_grad():
        model[0].weight.copy_(on_four_bit_grid((32, 64)))
    assert quantize_linears(model, four_bit=True) == 2
    assert isinstance(model[0], Int4WeightLinear) and isinstance(model[1], Int8WeightLinear)


def qkv_int4_layers(seed: int) -> list[Int4WeightLinear]:
    """SmolLM2's q, k and v shapes as int4 layers with random weights on a 4-bit grid."""
    from tests.unit.test_ragged import on_four_bit_grid

    torch.manual_seed(seed)
    layers = []
    for width in (576, 192, 192):
        linear = torch.nn.Linear(576, width, bias=False)
        with torch.no_grad():
            linear.weight.copy_(on_four_bit_grid((width, 576)))
        layers.append(Int4WeightLinear(linear, four_bit_grid(linear.weight), torch.bfloat16))
    return layers


def test_fused_int4_siblings_give_each_layer_its_own_output():
    """SmolLM2's q/k/v shapes as one int4 group: each member's columns bit for bit as the
    layer alone, for decode rows and prompt rows alike."""
    from deployments.engines.weights import FusedGroup

    layers = qkv_int4_layers(seed=9)
    x = torch.randn(6, 576).bfloat16()
    is_prompt = torch.tensor([True, False, True, True, False, False])
    alone = [layer(x) for layer in layers]
    with prompt_rows(is_prompt):
        alone_mixed = [layer(x) for layer in layers]
    FusedGroup(layers)
    assert torch.equal(torch.cat([layer(x) for layer in layers], dim=-1), torch.cat(alone, dim=-1))
    with prompt_rows(is_prompt):
        assert torch.equal(torch.cat([layer(x) for layer in layers], dim=-1), torch.cat(alone_mixed, dim=-1))
    assert layers[1](x[:2]).shape == (2, 192)  # a member called alone computes its own

"""The int8 engine's matmuls give each row the result it gets alone (batching changes no
output), on any CPU: the bf16 prompt path runs in fixed-size calls (``weights.dense_rows``)."""

from __future__ import annotations

import pytest
import torch

from deployments.engines.weights import DENSE_ROWS, Int8WeightLinear, dense_rows, prompt_rows

# SmolLM2's projections (fused q/k/v, fused gate/up, down) and its output head: on an AMX
# CPU a plain 33-row bf16 matmul of the last three rounds some rows unlike one row alone.
SHAPES = [(960, 576), (3072, 576), (576, 1536), (49152, 576)]


@pytest.mark.parametrize("shape", SHAPES)
def test_dense_rows_gives_each_row_what_it_gets_alone(shape):
    torch.set_num_threads(1)
    torch.manual_seed(3)
    dense = torch.randn(*shape).bfloat16()
    x = torch.randn(150, shape[1]).bfloat16()
    alone = torch.cat([dense_rows(x[i:i + 1], dense) for i in range(0, 150, 7)])
    for rows in (1, 20, DENSE_ROWS, DENSE_ROWS + 1, 150):
        got = dense_rows(x[:rows], dense)
        assert got.shape == (rows, shape[0])
        assert torch.equal(got[::7], alone[: len(got[::7])]), rows
    # the same rows behind other rows (another sequence's prompt packed first)
    shifted = dense_rows(torch.cat((torch.randn(45, shape[1]).bfloat16(), x)), dense)[45:]
    assert torch.equal(shifted[::7], alone)


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

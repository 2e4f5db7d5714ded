"""Troupe's int4 kernel (``deployments/engines/int4_kernel.c``), compiled on this machine:
with int8 inputs (the default) the exact product of the inputs it rounded, with bf16
inputs as close to the exact product as torch's int4 kernel; each row's result the same in
any batch and on any thread count either way, and torch's kernel wherever it cannot be
built."""

from __future__ import annotations

import logging

import pytest
import torch

from deployments.engines import int4_kernel
from deployments.engines.weights import FusedGroup, Int4WeightLinear, Int8WeightLinear, four_bit_grid, prompt_rows

needs_kernel = pytest.mark.skipif(
    not set(int4_kernel.REQUIRED_CPU_FLAGS) <= int4_kernel._cpu_flags(),
    reason="this CPU lacks AVX-512 BF16: the engine uses torch's int4 kernel (tested below)",
)

# SmolLM2's fused q/k/v, o, fused gate/up and down projections; a small odd one.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (48, 96)]


def grid(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=generator)
    scale = (torch.rand(n, k // 32, generator=generator) * 0.02).bfloat16()
    zero = (torch.randn(n, k // 32, generator=generator) * 0.01).bfloat16()
    return q, scale, zero


def exact(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    w = (q.reshape(n, -1, 32).double() - 8) * scale.double()[..., None] + zero.double()[..., None]
    return x.double() @ w.reshape(n, k).T


def rounded_inputs(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the int8 kernel takes it: per group of 32, int8 steps of the group's largest
    magnitude / 127, rounded half to even (float32 arithmetic, as the C code's)."""
    groups = x.float().reshape(x.shape[0], -1, 32)
    amax = groups.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, torch.tensor(127.0) / amax, torch.zeros(()))
    q = torch.round(groups * inv).clamp(-127, 127)
    return (q.double() * (amax / 127).double()).reshape(x.shape)


def assert_exact_for_rounded_inputs(ours: torch.Tensor, reference: torch.Tensor, unrounded: torch.Tensor) -> None:
    """The int32 sums are exact; then a few float32 operations per group and one bf16
    rounding: within one bf16 step of ``reference``, the product of what the kernel rounded
    the inputs to; and the inputs' rounding costs about half a percent of the product of
    the ``unrounded`` inputs."""
    assert ((ours - reference).abs() <= reference.abs() * 2 ** -8 + 1e-3).all()
    assert (ours - reference).abs().mean() <= reference.abs().mean() * 2 ** -8
    assert (ours - unrounded).abs().mean() <= unrounded.abs().mean() * 0.01


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_int8_inputs_give_the_exact_product_of_the_rounded_inputs(shape):
    n, k = shape
    q, scale, zero = grid(n, k, seed=n + k)
    words, scales = int4_kernel.pack(q, scale, zero)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    x[3, :32] = 0  # a group of zeros: step 0
    ours = int4_kernel.matmul(x, words, scales, "int8").double()
    reference = rounded_inputs(x) @ exact(torch.eye(k, dtype=torch.float64), q, scale, zero)
    assert_exact_for_rounded_inputs(ours, reference, exact(x, q, scale, zero))


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_inputs_match_the_exact_product_as_closely_as_torchs_kernel(shape):
    n, k = shape
    q, scale, zero = grid(n, k, seed=n + k)
    words, scales = int4_kernel.pack(q, scale, zero)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    scales_zeros = torch.stack((scale, zero), -1).transpose(0, 1).contiguous()
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    reference = exact(x, q, scale, zero)
    ours = int4_kernel.matmul(x, words, scales, "bf16").double()
    torchs = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros).double()
    # Both round a float32 sum to bf16: within one bf16 step (2**-8 relative) of the exact
    # product, and no further from it than torch's kernel on average.
    assert ((ours - reference).abs() <= reference.abs() * 2 ** -8 + 1e-4).all()
    assert (ours - reference).abs().mean() <= (torchs - reference).abs().mean() * 1.05


@needs_kernel
@pytest.mark.parametrize("kind", ["int8", "bf16"])
def test_each_row_gets_what_it_gets_alone_in_any_batch_and_on_any_thread_count(kind):
    q, scale, zero = grid(960, 576, seed=5)
    words, scales = int4_kernel.pack(q, scale, zero)
    x = torch.randn(19, 576, generator=torch.Generator().manual_seed(2)).bfloat16()
    threads = torch.get_num_threads()

    def mm(rows: torch.Tensor) -> torch.Tensor:
        return int4_kernel.matmul(rows, words, scales, kind)

    try:
        torch.set_num_threads(1)
        alone = torch.cat([mm(x[i:i + 1]) for i in range(19)])
        for rows in (2, 3, 4, 5, 8, 9, 16, 19):  # every way the kernel takes rows: 8, 4, 2, 1
            assert torch.equal(mm(x[:rows]), alone[:rows]), rows
        # the same rows behind another row, and from a non-contiguous view
        assert torch.equal(mm(torch.cat((x[:1], x[5:12])))[1:], alone[5:12])
        assert torch.equal(mm(x[::2]), alone[::2])
        torch.set_num_threads(2)
        assert torch.equal(mm(x), alone)
    finally:
        torch.set_num_threads(threads)


def int8_weights(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
    return q, (torch.rand(n, generator=generator) * 0.01).bfloat16()


@needs_kernel
@pytest.mark.parametrize("shape", [(49152 // 64, 576), (576, 1536), (48, 96)])
def test_int8_weights_give_the_exact_product_of_the_rounded_inputs(shape):
    n, k = shape
    q, scale = int8_weights(n, k, seed=n)
    weights, scales = int4_kernel.pack_int8(q, scale)
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(1)).bfloat16()
    x[2, 32:64] = 0
    ours = int4_kernel.matmul_int8(x, weights, scales).double()
    reference = rounded_inputs(x) @ (q.double() * scale.double()[:, None]).T
    assert_exact_for_rounded_inputs(ours, reference, x.double() @ (q.double() * scale.double()[:, None]).T)


@needs_kernel
def test_int8_weights_give_each_row_what_it_gets_alone():
    q, scale = int8_weights(320, 576, seed=7)
    weights, scales = int4_kernel.pack_int8(q, scale)
    x = torch.randn(19, 576, generator=torch.Generator().manual_seed(2)).bfloat16()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = torch.cat([int4_kernel.matmul_int8(x[i:i + 1], weights, scales) for i in range(19)])
        for rows in (2, 3, 4, 5, 8, 9, 16, 19):
            assert torch.equal(int4_kernel.matmul_int8(x[:rows], weights, scales), alone[:rows]), rows
        assert torch.equal(int4_kernel.matmul_int8(x[::2], weights, scales), alone[::2])
        torch.set_num_threads(2)
        assert torch.equal(int4_kernel.matmul_int8(x, weights, scales), alone)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_the_engines_int8_layers_use_it_and_fuse():
    torch.manual_seed(12)
    layers = [Int8WeightLinear(torch.nn.Linear(576, width, bias=False), torch.bfloat16) for width in (576, 192, 192)]
    assert all(layer.own_kernel for layer in layers)
    odd = Int8WeightLinear(torch.nn.Linear(576, 40, bias=False), torch.bfloat16)
    assert not odd.own_kernel  # not whole blocks of 16 output channels: torch's kernel
    x = torch.randn(5, 576).bfloat16()
    alone = torch.cat([layer(x) for layer in layers], dim=-1)
    group = FusedGroup(layers)
    assert group.own_kernel
    assert torch.equal(group.kernel(x), alone)
    assert torch.equal(torch.cat([layer(x) for layer in layers], dim=-1), alone)
    assert torch.equal(layers[2](x[:2]), alone[:2, 768:])


@needs_kernel
def test_the_engines_int4_layers_use_it_and_fuse():
    from tests.unit.test_weights import qkv_int4_layers

    layers = qkv_int4_layers(seed=11)
    assert all(layer.own_kernel for layer in layers)
    x = torch.randn(5, 576).bfloat16()
    alone = torch.cat([layer(x) for layer in layers], dim=-1)
    group = FusedGroup(layers)
    assert group.own_kernel
    assert torch.equal(group.kernel(x), alone)
    assert torch.equal(torch.cat([layer(x) for layer in layers], dim=-1), alone)
    assert torch.equal(layers[2](x[:2]), alone[:2, 768:])  # a member alone: its own slice


@pytest.fixture
def fresh_kernel_state(monkeypatch, tmp_path):
    """A process that has not tried to build the kernel yet, with an empty cache."""
    monkeypatch.setattr(int4_kernel, "_tried", False)
    monkeypatch.setattr(int4_kernel, "_loaded", None)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_troupe_int4_kernel_torch_keeps_torchs_kernel(fresh_kernel_state, monkeypatch):
    from tests.unit.test_ragged import on_four_bit_grid

    monkeypatch.setenv("TROUPE_INT4_KERNEL", "torch")
    assert int4_kernel.load() is None
    linear = torch.nn.Linear(576, 192, bias=False)
    with torch.no_grad():
        linear.weight.copy_(on_four_bit_grid((192, 576)))
    q, step, low = four_bit_grid(linear.weight)
    layer = Int4WeightLinear(linear, (q, step, low), torch.bfloat16)
    assert not layer.own_kernel
    x = torch.randn(3, 576).bfloat16()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    scales_zeros = torch.stack((step.bfloat16(), (low + 8 * step).bfloat16()), -1).transpose(0, 1).contiguous()
    assert torch.equal(layer(x), torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_zeros))
    with prompt_rows(torch.tensor([True, False, False])):
        assert layer(x).shape == (3, 192)


def test_a_failed_build_is_torchs_kernel_and_one_warning(fresh_kernel_state, monkeypatch, caplog):
    monkeypatch.delenv("TROUPE_INT4_KERNEL", raising=False)
    monkeypatch.setattr(int4_kernel, "_cpu_flags", lambda: set(int4_kernel.REQUIRED_CPU_FLAGS))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="troupe.engine.int4"):
        assert int4_kernel.load() is None
        assert int4_kernel.load() is None  # tried once per process
    assert [r.message for r in caplog.records if "not built" in r.message] != []
    assert len(caplog.records) == 1
    assert not list((fresh_kernel_state / ".cache" / "troupe" / "kernels").glob("*.so"))


def test_a_cpu_without_avx512_bf16_keeps_torchs_kernel(fresh_kernel_state, monkeypatch):
    monkeypatch.delenv("TROUPE_INT4_KERNEL", raising=False)
    monkeypatch.setattr(int4_kernel, "_cpu_flags", lambda: {"avx2", "fma"})
    assert int4_kernel.load() is None


@needs_kernel
@pytest.mark.parametrize("setting", ["", "int8", "bf16", "nonsense"])
def test_troupe_int4_kernel_picks_the_inputs(fresh_kernel_state, monkeypatch, setting):
    monkeypatch.setenv("TROUPE_INT4_KERNEL", setting)
    assert int4_kernel.load() is not None
    kind = "bf16" if setting == "bf16" else "int8"
    assert int4_kernel.inputs() == kind
    q, scale, zero = grid(48, 96, seed=3)
    words, scales = int4_kernel.pack(q, scale, zero)
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4)).bfloat16()
    assert torch.equal(int4_kernel.matmul(x, words, scales), int4_kernel.matmul(x, words, scales, kind))
    other = "int8" if kind == "bf16" else "bf16"
    assert not torch.equal(int4_kernel.matmul(x, words, scales), int4_kernel.matmul(x, words, scales, other))
    # int8 layers take Troupe's kernel only with int8 inputs; with bf16 inputs, torch's
    assert Int8WeightLinear(torch.nn.Linear(96, 48, bias=False), torch.bfloat16).own_kernel == (kind == "int8")


@needs_kernel
def test_a_second_process_finds_the_built_kernel(fresh_kernel_state, monkeypatch):
    monkeypatch.delenv("TROUPE_INT4_KERNEL", raising=False)
    assert int4_kernel.load() is not None
    [built] = (fresh_kernel_state / ".cache" / "troupe" / "kernels").glob("int4-*.so")
    monkeypatch.setattr(int4_kernel, "_tried", False)
    monkeypatch.setenv("CC", "false")  # would fail if it compiled again
    assert int4_kernel.load() is not None
    assert list(built.parent.iterdir()) == [built]  # no scratch left behind

"""Troupe's int4 (and int8) weight-only matmuls for bf16 rows (``int4_kernel.c``), built on first use.

torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) reads the bundled SmolLM2's
weights at about 6-9 GB/s for one row, below what one core reads from cache: it spends its
time unpacking, and a one-token decode step spends about 40% of its time in it. This
kernel has two ways to multiply, over one packed layout (:func:`pack`), each reading a
weight block once for up to 8 rows:

- ``int8`` inputs (the default): each row's inputs are rounded to int8 per group of 32 (the
  group's largest magnitude / 127), as llama.cpp does for its 4-bit formats, and AVX-512
  VNNI's ``vpdpbusd`` multiplies them by the 4-bit values, 64 products an instruction,
  summed exactly in int32. On SmolLM2 the mean next-token loss over a fixed text is within
  0.1% of bf16 inputs' (4.330 against 4.326 nats, ``bench/int4_kernel_bench.py``), and a
  batch of 8 rows costs a half to a third of what bf16 inputs cost it;
- ``bf16`` inputs (``TROUPE_INT4_KERNEL=bf16``): each 4-bit value becomes a bf16 number
  with two vector instructions and AVX-512 BF16's ``vdpbf16ps`` multiplies (exact
  products, float32 sums): no rounding but the sums', bound by ``vdpbf16ps`` (32 products
  an instruction) once there are a few rows. Measurements: ``bench/README.md``.

With int8 inputs, int8 layers (one scale per output channel: the bundled model's output
head) go through the same kind of kernel (:func:`matmul_int8`, :func:`pack_int8`); with
bf16 inputs they stay on torch's int8 kernel.

Either way each row's result is computed by the same instructions in the same order
whatever the other rows and the thread count, so batching changes no output. All of them
round differently from torch's kernels.

The C file is compiled with the machine's C compiler (``$CC``, else ``cc``) the first time a
process needs it, into ``~/.cache/troupe/kernels`` (named by the source's and flags' hash;
a second process finds it there), in about half a second. Without a compiler, on a CPU
without AVX-512 BF16 and VNNI, or with ``TROUPE_INT4_KERNEL=torch``, :func:`load` returns
None and the engine uses torch's kernel (one warning in the log says why).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Optional

import torch

__all__ = ["load", "pack", "matmul", "pack_int8", "matmul_int8", "inputs", "FLAGS", "REQUIRED_CPU_FLAGS"]

logger = logging.getLogger("troupe.engine.int4")

SOURCE = Path(__file__).with_name("int4_kernel.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni", "-mfma",
         "-fopenmp", "-shared", "-fPIC")
#: /proc/cpuinfo flags the compiled code needs.
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "fma")
#: The C function of each kind of inputs.
FUNCTIONS = {"int8": "troupe_int4_mm_a8", "bf16": "troupe_int4_mm"}

_lock = threading.Lock()
_loaded: Optional[ctypes.CDLL] = None
_tried = False


def inputs() -> str:
    """How the kernel takes its inputs: ``TROUPE_INT4_KERNEL`` (``int8``, the default, or
    ``bf16``; ``torch`` turns the kernel off)."""
    chosen = os.environ.get("TROUPE_INT4_KERNEL", "").lower() or "int8"
    return chosen if chosen in FUNCTIONS else "int8"


def load() -> Optional[ctypes.CDLL]:
    """The compiled kernel, or None where it cannot run here (see the module docstring)."""
    global _loaded, _tried
    if _tried:
        return _loaded
    with _lock:
        if not _tried:
            try:
                _loaded = _build()
            except Exception as exc:  # a failed build is a slower kernel, never a failed model
                logger.warning("int4 kernel not built (%s): using torch's int4 kernel", exc)
                _loaded = None
            _tried = True
    return _loaded


def _build() -> Optional[ctypes.CDLL]:
    chosen = os.environ.get("TROUPE_INT4_KERNEL", "").lower()
    if chosen == "torch":
        return None
    if chosen not in ("", *FUNCTIONS):
        logger.warning("TROUPE_INT4_KERNEL=%s is not one of int8, bf16, torch: using int8", chosen)
    missing = [flag for flag in REQUIRED_CPU_FLAGS if flag not in _cpu_flags()]
    if missing:
        logger.info("int4 kernel off: this CPU lacks %s; using torch's int4 kernel", ", ".join(missing))
        return None
    compiler = shutil.which(os.environ.get("CC") or "cc")
    if compiler is None:
        raise RuntimeError("no C compiler (cc) on PATH")
    source = SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    target = Path.home() / ".cache" / "troupe" / "kernels" / f"int4-{digest}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
            built = Path(scratch) / target.name
            result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built)],
                                    capture_output=True, text=True, timeout=120)
            if result.returncode != 0:
                raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
            os.replace(built, target)  # atomic: a concurrent build's file is the same
    lib = ctypes.CDLL(str(target))
    for name in (*FUNCTIONS.values(), "troupe_int8_mm_a8"):
        function = getattr(lib, name)
        function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_void_p, ctypes.c_int]
        function.restype = ctypes.c_int
    return lib


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def pack(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's layouts (``int4_kernel.c``) of ``q`` [N, K] (values 0..15) and the bf16
    ``scale`` and ``zero`` [N, K / 32] of w = (q - 8) * scale + zero. N a multiple of 16,
    K of 32. Returns ``words`` int16 [N/16, K/32, 4, 32] and ``scales`` bf16 [N/16, K/32, 2, 16];
    both stay row-block-local, so fused siblings concatenate along dim 0."""
    n, k = q.shape
    groups, blocks = k // 32, n // 16
    v = q.to(torch.int32).reshape(blocks, 16, groups, 4, 4, 2)  # block, lane, group, quarter, nibble, c
    words = v[..., 0, :] | (v[..., 1, :] << 4) | (v[..., 2, :] << 8) | (v[..., 3, :] << 12)
    words = words.permute(0, 2, 3, 1, 4).reshape(blocks, groups, 4, 32)
    words = torch.where(words >= 1 << 15, words - (1 << 16), words).to(torch.int16).contiguous()
    scales = torch.stack((scale, zero)).to(torch.bfloat16).reshape(2, blocks, 16, groups)
    return words, scales.permute(1, 3, 0, 2).contiguous()


#: Where each 8 inputs of a group sit in the kernel's rounded inputs (``QUARTER_ORDER``).
QUARTER_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)


def pack_int8(q: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The int8 kernel's layouts (``troupe_int8_mm_a8``) of ``q`` int8 [N, K] (-127..127)
    and its per-channel ``scale`` [N] (w = q * scale). N a multiple of 16, K of 32. Returns
    uint8 [N/16, K/32, 8, 64] (q + 128) and bf16 [N/16, 16]: block-local, as :func:`pack`'s."""
    n, k = q.shape
    v = (q.to(torch.int16) + 128).to(torch.uint8).reshape(n // 16, 16, k // 32, 4, 8)
    v = v[..., list(QUARTER_ORDER)].reshape(n // 16, 16, k // 32, 8, 4)  # block, lane, group, quad, i
    packed = v.permute(0, 2, 3, 1, 4).reshape(n // 16, k // 32, 8, 64).contiguous()
    return packed, scale.to(torch.bfloat16).reshape(n // 16, 16).contiguous()


def matmul_int8(flat: torch.Tensor, weights: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``flat`` [rows, K] (bf16) times int8 weights packed by :func:`pack_int8`, each row's
    inputs rounded to int8 per group of 32 as for the int4 layers: [rows, N] bf16."""
    lib = load()
    assert lib is not None, "int4 kernel not loaded"
    return _run(lib.troupe_int8_mm_a8, flat, weights, scales)


def matmul(flat: torch.Tensor, words: torch.Tensor, scales: torch.Tensor,
           kind: Optional[str] = None) -> torch.Tensor:
    """``flat`` [rows, K] (bf16) times the packed weights: [rows, N] bf16. ``kind``: the
    inputs' (``int8`` or ``bf16``); default :func:`inputs`."""
    lib = load()
    assert lib is not None, "int4 kernel not loaded"
    return _run(getattr(lib, FUNCTIONS[kind or inputs()]), flat, words, scales)


def _run(function: Any, flat: torch.Tensor, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    if not flat.is_contiguous():
        flat = flat.contiguous()
    rows, k = flat.shape
    n = words.shape[0] * 16
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    if function(words.data_ptr(), scales.data_ptr(), flat.data_ptr(), rows, k, n,
                out.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError("int4 kernel: out of memory")
    return out

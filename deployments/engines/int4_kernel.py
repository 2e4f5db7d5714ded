"""Troupe's int4 weight-only matmul for bf16 rows (``int4_kernel.c``), built on first use.

torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``) reads the bundled SmolLM2's
weights at about 6-9 GB/s for one row, below what one core reads from cache: it spends its
time unpacking, and a one-token decode step spends about 40% of its time in it. This kernel
turns a 4-bit value into a bf16 number with two vector instructions and multiplies with
AVX-512 BF16's ``vdpbf16ps`` (exact products, float32 sums), and reads each weight block
once for up to 8 rows. Measurements: ``bench/README.md``.

Each row's result is computed by the same instructions in the same order whatever the
other rows and the thread count, so batching changes no output. Its rounding differs from
torch's kernel (another summation order); both are float32 sums of the same exact products.

The C file is compiled with the machine's C compiler (``$CC``, else ``cc``) the first time a
process needs it, into ``~/.cache/troupe/kernels`` (named by the source's and flags' hash;
a second process finds it there), in about half a second. Without a compiler, on a CPU
without AVX-512 BF16, or with ``TROUPE_INT4_KERNEL=torch``, :func:`load` returns None and
the engine uses torch's kernel (one warning in the log says why).
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
from typing import Optional

import torch

__all__ = ["load", "pack", "matmul", "FLAGS", "REQUIRED_CPU_FLAGS"]

logger = logging.getLogger("troupe.engine.int4")

SOURCE = Path(__file__).with_name("int4_kernel.c")
FLAGS = ("-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma", "-fopenmp",
         "-shared", "-fPIC")
#: /proc/cpuinfo flags the compiled code needs.
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "fma")

_lock = threading.Lock()
_loaded: Optional[ctypes.CDLL] = None
_tried = False


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
    if os.environ.get("TROUPE_INT4_KERNEL", "").lower() == "torch":
        return None
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
    lib.troupe_int4_mm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_void_p, ctypes.c_int]
    lib.troupe_int4_mm.restype = ctypes.c_int
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


def matmul(flat: torch.Tensor, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``flat`` [rows, K] (bf16) times the packed weights: [rows, N] bf16."""
    lib = load()
    assert lib is not None, "int4 kernel not loaded"
    if not flat.is_contiguous():
        flat = flat.contiguous()
    rows, k = flat.shape
    n = words.shape[0] * 16
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    if lib.troupe_int4_mm(words.data_ptr(), scales.data_ptr(), flat.data_ptr(), rows, k, n,
                          out.data_ptr(), torch.get_num_threads()) != 0:
        raise MemoryError("int4 kernel: out of memory")
    return out

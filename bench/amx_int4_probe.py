"""Probe: would AMX tiles make Troupe's int4 kernel cheaper for a batch? (not used by the engine)

``bench/amx_int4_probe.c`` multiplies the engine kernel's int4 layout with AMX
(``tdpbf16ps``) instead of AVX-512 BF16 (``vdpbf16ps``). On SmolLM2's int4 shapes, one
thread, 1 to 16 rows, both interleaved: the fastest of 5 timings of 300 calls each; whether
each row's AMX result is what AMX gives it alone (batch-invariance) and whether it equals
the engine kernel's with bf16 inputs bit for bit (so a batch could take AMX and a lone row AVX-512 without
changing any output). Needs a CPU with AMX-BF16 on Linux and ``cc``.

    python -m bench.amx_int4_probe

Writes ``bench/results/<timestamp>-amx-int4-probe.md``.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from bench.int4_kernel_bench import fastest, random_int4
from deployments.engines import int4_kernel

RESULTS = Path(__file__).parent / "results"
SOURCE = Path(__file__).with_name("amx_int4_probe.c")
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
ROWS = [1, 2, 4, 8, 16]


def _build(scratch: str) -> ctypes.CDLL:
    compiler = shutil.which("cc")
    assert compiler, "needs a C compiler (cc)"
    target = Path(scratch) / "amx_int4_probe.so"
    subprocess.run([compiler, "-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma",
                    "-mamx-tile", "-mamx-bf16", "-shared", "-fPIC", str(SOURCE), "-o", str(target)],
                   check=True)
    lib = ctypes.CDLL(str(target))
    lib.probe_amx_int4_mm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long] * 3 + [ctypes.c_void_p]
    assert lib.probe_amx_init() == 0, "the kernel refused AMX to this process"
    return lib


def _amx(lib: ctypes.CDLL, x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    rows, k = x.shape
    out = torch.empty(rows, words.shape[0] * 16, dtype=torch.bfloat16)
    lib.probe_amx_int4_mm(words.data_ptr(), scales.data_ptr(), x.data_ptr(), rows, k, out.shape[1],
                          out.data_ptr())
    return out


def main() -> None:
    assert {"amx_bf16", "amx_tile"} <= int4_kernel._cpu_flags(), "this CPU has no AMX-BF16"
    assert int4_kernel.load() is not None, "the engine's int4 kernel does not build here"
    torch.set_num_threads(1)
    lines = ["| shape | rows | AVX-512 (engine) us | AMX us | AMX rows as alone | AMX equals AVX-512 |",
             "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as scratch:
        lib = _build(scratch)
        generator = torch.Generator().manual_seed(0)
        for n, k in SHAPES:
            words, scales = int4_kernel.pack(*random_int4(n, k, generator))
            x = torch.randn(max(ROWS), k, generator=generator).bfloat16()
            alone = torch.cat([_amx(lib, x[i:i + 1], words, scales) for i in range(len(x))])
            for rows in ROWS:
                xr = x[:rows].contiguous()
                amx = _amx(lib, xr, words, scales)
                avx = int4_kernel.matmul(xr, words, scales, "bf16")
                lines.append(
                    f"| {n}x{k} | {rows} | {fastest(partial(int4_kernel.matmul, xr, words, scales, 'bf16')):.1f} "
                    f"| {fastest(partial(_amx, lib, xr, words, scales)):.1f} "
                    f"| {torch.equal(amx, alone[:rows])} | {torch.equal(amx, avx)} |")
                print(lines[-1], flush=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    RESULTS.mkdir(exist_ok=True)
    head = "# AMX probe: the int4 kernel's layout through AMX tiles against the engine's AVX-512 kernel (1 thread)"
    (RESULTS / f"{stamp}-amx-int4-probe.md").write_text("\n".join([head, "", *lines]) + "\n")


if __name__ == "__main__":
    main()

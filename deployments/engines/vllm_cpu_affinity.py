"""Keep the process hosting vLLM's front end, and vLLM's engine core, off the CPU worker's cores.

On CPU, vLLM binds its worker's OpenMP threads to cores of their own (``VLLM_CPU_OMP_THREADS_BIND``,
``auto`` by default: one core per physical core, keeping the last for "other processes") but
binds nothing else. Its engine core waits for the worker by spinning on ``sched_yield`` (about
three quarters of a core on the 2-core machine, issue 17), and the Linux scheduler is free to
run that spin, and the gateway's HTTP and streaming work, on the worker's core, where every
slice it takes is a slice the model does not compute. ``vllm serve`` has the same exposure with
fewer processes; a gateway has more (proxy, gateway, Troupe's own loops), so it pins them.

This moves every thread of the hosting process and of vLLM's other child processes to the
cores the workers do not hold. It does nothing when the workers hold every core, when they are
not bound (``nobind``), or where affinity cannot be read or set (not Linux, a process gone).
"""

from __future__ import annotations

import logging
import os
from typing import Iterable, Optional

__all__ = ["keep_off_worker_cores", "pin_after_cpu_start", "set_process_affinity", "worker_cores"]

logger = logging.getLogger(__name__)

WORKER_TITLE = "VLLM::Worker"  # vLLM's process titles: VLLM::Worker, VLLM::Worker_TP0, ...


def _threads(pid: int) -> list[int]:
    try:
        return [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def set_process_affinity(pid: int, cores: set[int]) -> int:
    """Binds every thread of ``pid`` to ``cores`` (``sched_setaffinity`` binds one thread);
    threads it starts later inherit it. Returns how many threads were bound."""
    bound = 0
    for tid in _threads(pid):
        try:
            os.sched_setaffinity(tid, cores)
            bound += 1
        except OSError:  # the thread ended meanwhile
            continue
    return bound


def worker_cores(worker_pids: Iterable[int]) -> set[int]:
    """The cores vLLM's CPU workers' threads are bound to (the union over their threads)."""
    cores: set[int] = set()
    for pid in worker_pids:
        for tid in _threads(pid):
            try:
                cores |= os.sched_getaffinity(tid)
            except OSError:
                continue
    return cores


def keep_off_worker_cores(root_pid: Optional[int] = None) -> Optional[set[int]]:
    """Moves ``root_pid`` (default: this process) and its non-worker descendants off the cores
    vLLM's CPU workers are bound to.

    Returns:
        The cores those processes may use now, or None when nothing was changed.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    import psutil

    root = psutil.Process(root_pid or os.getpid())
    try:
        children = root.children(recursive=True)
        titles = {p.pid: (p.cmdline() or [""])[0] for p in children}
    except psutil.Error:
        return None
    workers = [pid for pid, title in titles.items() if title.startswith(WORKER_TITLE)]
    allowed = os.sched_getaffinity(root.pid)
    held = worker_cores(workers)
    free = allowed - held
    if not workers or not held or not free:
        return None
    for pid in [root.pid, *(pid for pid in titles if pid not in workers)]:
        set_process_affinity(pid, free)
    logger.info("vLLM CPU workers hold cores %s; the front end and engine core run on %s",
                sorted(held), sorted(free))
    return free


def pin_after_cpu_start() -> Optional[set[int]]:
    """After vLLM started on its CPU platform: :func:`keep_off_worker_cores`, unless
    ``TROUPE_VLLM_CPU_AFFINITY=0`` (then the scheduler places everything, as ``vllm serve``)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or os.environ.get("TROUPE_VLLM_CPU_AFFINITY", "1") == "0":
        return None
    return keep_off_worker_cores()

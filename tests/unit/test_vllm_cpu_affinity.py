"""vLLM on CPU: the process hosting the front end and vLLM's engine core leave the worker's
cores to the worker (issue 17). Real processes stand in for vLLM's: a parent with two children
titled as vLLM titles them, the worker bound to one core as vLLM binds it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest

from deployments.engines.vllm_cpu_affinity import keep_off_worker_cores
from tests.conftest import wait_until

pytestmark = pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")

FAMILY = """
import subprocess, sys, time
worker = subprocess.Popen(["VLLM::Worker", "60"], executable="/bin/sleep")
core = subprocess.Popen(["VLLM::EngineCore", "60"], executable="/bin/sleep")
print(worker.pid, core.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture()
def family():
    parent = subprocess.Popen([sys.executable, "-c", FAMILY], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    worker, core = (int(x) for x in parent.stdout.readline().split())
    yield parent.pid, worker, core
    os.killpg(parent.pid, signal.SIGKILL)
    parent.wait(10)


def _wait_titles(pid: int) -> None:
    def titled() -> bool:  # both children exec'd: their titles are readable
        titles = [" ".join(c.cmdline()[:1]) for c in psutil.Process(pid).children()]
        return sorted(titles) == ["VLLM::EngineCore", "VLLM::Worker"]

    wait_until(titled, timeout=10)


def test_front_end_and_engine_core_move_off_the_workers_core(family) -> None:
    parent, worker, core = family
    _wait_titles(parent)
    allowed = os.sched_getaffinity(parent)
    worker_core = min(allowed)
    os.sched_setaffinity(worker, {worker_core})  # as vLLM binds its OpenMP threads
    free = keep_off_worker_cores(parent)
    assert free == allowed - {worker_core}
    assert os.sched_getaffinity(parent) == free
    assert os.sched_getaffinity(core) == free
    assert os.sched_getaffinity(worker) == {worker_core}  # the worker keeps its core


def test_unbound_workers_change_nothing(family) -> None:
    parent, _worker, core = family
    _wait_titles(parent)
    allowed = os.sched_getaffinity(parent)
    assert keep_off_worker_cores(parent) is None  # nobind: the worker may use every core
    assert os.sched_getaffinity(parent) == allowed and os.sched_getaffinity(core) == allowed

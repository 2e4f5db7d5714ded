"""LoRA adapters in the continuous-batching loop (issue 19), without weights on disk.

Adapter loads run on the loop's thread between two steps; a step that mixes sequences of
different adapters runs each with its own adapter and computes what each computes alone;
a step without adapters calls the model exactly as before.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("peft")

from deployments.engines.batch_loop import BatchLoop, Sampler, Seq  # noqa: E402
from deployments.engines.lora_peft import PeftAdapters  # noqa: E402
from deployments.engines.ragged import RaggedModel  # noqa: E402
from tests.unit.test_ragged import tiny_llama  # noqa: E402


class RecordingStepper:
    """Logits that pick token 1; records each step's adapters argument."""

    def __init__(self) -> None:
        self.calls: list[object] = []

    def new_kv(self) -> object:
        return object()

    def step(self, kvs, chunks, *rest):
        self.calls.append(rest[0] if rest else "no adapters argument")
        logits = torch.zeros(len(chunks), 4)
        logits[:, 1] = 1.0
        return logits


def job(adapter=None, max_new=2):
    return SimpleNamespace(input_ids=[1, 2], adapter=adapter, finished=False,
                           cancel=threading.Event(), future=_Future(), cached_tokens=0,
                           produced=0, max_new=max_new, priority=None)


class _Future:
    def __init__(self) -> None:
        self.done_event = threading.Event()

    def set_running_or_notify_cancel(self) -> bool:
        return True

    def cancel(self) -> bool:
        return False


def run_loop(stepper, jobs):
    def on_token(j, token):
        j.produced += 1
        if j.produced >= j.max_new:
            j.finished = True

    loop = BatchLoop(stepper, max_num_seqs=8, max_batch_tokens=64, max_queue_wait_s=None,
                     num_threads=1, on_token=on_token,
                     on_leave=lambda seq, err: seq.job.future.done_event.set(),
                     on_expire=lambda seq, wait: None)
    try:
        gate = threading.Event()
        loop.run_between_steps(gate.wait)  # hold the loop so all jobs join one step
        for j in jobs:
            loop.submit(Seq(j, Sampler(None, 1.0, None)), "k", None)
        gate.set()
        for j in jobs:
            assert j.future.done_event.wait(10)
        return loop
    finally:
        loop.close()


def test_steps_without_adapters_call_the_model_as_before() -> None:
    stepper = RecordingStepper()
    run_loop(stepper, [job(), job()])
    assert stepper.calls and set(stepper.calls) == {"no adapters argument"}


def test_a_step_with_adapters_names_each_sequences_adapter() -> None:
    stepper = RecordingStepper()
    run_loop(stepper, [job("a"), job(None), job("b")])
    assert stepper.calls[0] == ["a", None, "b"]


def test_work_between_steps_runs_on_the_loop_thread_and_reports_errors() -> None:
    loop = BatchLoop(RecordingStepper(), max_num_seqs=2, max_batch_tokens=8,
                     max_queue_wait_s=None, num_threads=1, on_token=lambda j, t: None,
                     on_leave=lambda s, e: None, on_expire=lambda s, w: None, name="lora-test")
    try:
        assert loop.run_between_steps(lambda: threading.current_thread().name).result(5) == "lora-test"
        with pytest.raises(ZeroDivisionError):
            loop.run_between_steps(lambda: 1 / 0).result(5)
    finally:
        loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop.run_between_steps(lambda: None).result(5)


def save_adapter(model, folder: Path, seed: int) -> str:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                        init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(str(folder))
    peft_model.unload()
    return str(folder)


def test_a_mixed_adapter_step_equals_each_sequence_alone(tmp_path: Path) -> None:
    model = tiny_llama()
    paths = {name: save_adapter(model, tmp_path / name, seed)
             for seed, name in enumerate(("one", "two"), start=1)}
    stepper = RaggedModel(model)
    prompts = [[5, 6, 7], [11, 12], [20, 21, 22, 23]]
    base = stepper.step([stepper.new_kv() for _ in prompts], prompts)
    stepper.lora = PeftAdapters(model)
    for name, path in paths.items():
        stepper.lora.load(name, path)
    adapters = ["one", None, "two"]
    mixed = stepper.step([stepper.new_kv() for _ in prompts], prompts, adapters)
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):
        alone = stepper.step([stepper.new_kv()], [prompt], [adapter])[0]
        assert torch.allclose(mixed[i], alone, atol=1e-5)
    assert torch.allclose(mixed[1], base[1], atol=1e-5)  # the base sequence is untouched
    assert not torch.allclose(mixed[0], base[0], atol=1e-3)  # the adapter mattered
    assert not torch.allclose(stepper.step([stepper.new_kv()], [prompts[0]], ["two"])[0],
                              mixed[0], atol=1e-3)  # and each adapter is its own

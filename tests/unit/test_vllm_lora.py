"""LoRA adapters on the vLLM engine, against the fake AsyncLLM (add_lora, remove_lora,
generate(lora_request=...)) in vllm_fakes."""

from __future__ import annotations

from pathlib import Path

import pytest

from deployments.engines.vllm_engine import build_engine_args
from deployments.llm import LLMDeployment
from serve_app.errors import AdapterInvalid
from serve_app.protocol.internal import GenerationRequest, SamplingParams
from serve_app.settings import ModelConfig
from tests.unit.test_lora_adapters import make_adapter
from tests.unit.vllm_fakes import FakeAsyncLLM, FakeLoRARequest, RecordedSamplingParams


def model_with_adapters(tmp_path: Path, **adapters) -> ModelConfig:
    paths = {name: make_adapter(tmp_path / name, base="/models/fake") for name in ("a", "b", "c")}
    return ModelConfig.model_validate({
        "id": "fake-model", "engine": {"type": "vllm", "model": "/models/fake"},
        "adapters": {"paths": paths, "max_loaded": 2, **adapters},
    })


def test_adapters_turn_on_vllm_lora_sized_from_the_adapter_settings(tmp_path: Path) -> None:
    args = build_engine_args("m", model_with_adapters(tmp_path, max_rank=24).engine)
    assert (args["enable_lora"], args["max_loras"], args["max_lora_rank"]) == (True, 2, 32)


def test_without_adapters_lora_stays_off(tmp_path: Path) -> None:
    args = build_engine_args("m", ModelConfig.model_validate(
        {"id": "m", "engine": {"type": "vllm", "model": "/models/fake"}}).engine)
    assert "enable_lora" not in args


async def deployment(model: ModelConfig) -> tuple[LLMDeployment, list[FakeAsyncLLM]]:
    from deployments.engines.vllm_engine import VLLMTextEngine

    fakes: list[FakeAsyncLLM] = []

    def factory(engine_args):
        fakes.append(FakeAsyncLLM(engine_args))
        return fakes[-1]

    engine = VLLMTextEngine(model.id, model.engine, engine_factory=factory,
                            sampling_params_factory=RecordedSamplingParams,
                            lora_request_factory=FakeLoRARequest)
    dep = LLMDeployment(model, engine=engine)
    await dep.start()
    return dep, fakes


def request(adapter: str | None, rid: str) -> GenerationRequest:
    return GenerationRequest(rid, SamplingParams(max_tokens=4, temperature=0), prompt="hi",
                             adapter=adapter)


async def test_requests_carry_their_lora_request_and_the_lru_evicts_beyond_two(tmp_path: Path) -> None:
    dep, fakes = await deployment(model_with_adapters(tmp_path))
    vllm = fakes[0]
    for i, adapter in enumerate(["a", "b", None, "a", "c"]):
        await dep.complete(request(adapter, f"r{i}"))
    names = [s.lora_request.lora_name if s.lora_request else None for s in vllm.submitted]
    assert names == ["a", "b", None, "a", "c"]
    # c evicted b (least recently used): vLLM holds a and c.
    assert sorted(lora.lora_name for lora in vllm.loras.values()) == ["a", "c"]
    ids = {s.lora_request.lora_int_id for s in vllm.submitted if s.lora_request}
    assert len(ids) == 3 and 0 not in ids


async def test_an_adapter_vllm_refuses_is_a_400_naming_it(tmp_path: Path) -> None:
    model = model_with_adapters(tmp_path, max_rank=8)
    make_adapter(tmp_path / "wide", rank=64, base="/models/fake")
    dep, _ = await deployment(model)
    bad = request("wide", "r1")
    bad.adapter_path = str(tmp_path / "wide")
    with pytest.raises(AdapterInvalid, match="rank 64") as caught:
        await dep.complete(bad)
    assert caught.value.status == 400


async def test_a_request_for_an_adapter_not_loaded_leaves_nothing_in_flight(tmp_path: Path) -> None:
    dep, fakes = await deployment(model_with_adapters(tmp_path))
    engine = dep.engine
    with pytest.raises(AdapterInvalid, match="ghost"):
        await anext(engine.generate(request("ghost", "r1")))
    assert engine.active_requests() == 0 and fakes[0].submitted == []

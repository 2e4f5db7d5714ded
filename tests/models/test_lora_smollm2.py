"""LoRA adapters on the real bundled SmolLM2 through the transformers engine and peft.

Three seeded adapters are built once in a temp folder. At temperature 0 each adapter
answers differently from the base model and from the others, and the same on every call;
with room for two, a third evicts the least recently used and a reload answers as before.
A mixed batch (one forward, a different adapter per row) matches per-sequence forwards:
continuous batching may put sequences with different adapters in one step.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio
import torch

from deployments.llm import LLMDeployment
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams
from serve_app.settings import ModelConfig
from tests.lora_fixtures import build_smollm2_adapters

pytestmark = [pytest.mark.models, pytest.mark.asyncio(loop_scope="module")]

QUESTION = [ChatMessage("user", "Name three colours.")]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return build_smollm2_adapters(tmp_path_factory.mktemp("lora"), ["one", "two", "three"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def smollm(adapters: dict[str, str]):
    torch.set_num_threads(1)
    model = ModelConfig.model_validate({
        "id": "smollm2", "engine": {"type": "transformers", "num_threads": 1, "weights": "float32"},
        "adapters": {"paths": adapters, "max_loaded": 2, "max_rank": 8},
    })
    dep = LLMDeployment(model)
    await dep.start()
    yield dep
    await dep.shutdown()


async def answer(dep: LLMDeployment, adapter: str | None, rid: str) -> str:
    request = GenerationRequest(rid, SamplingParams(max_tokens=12, temperature=0.0),
                                messages=list(QUESTION), adapter=adapter)
    return (await dep.complete(request)).text


async def test_each_adapter_changes_greedy_output_and_repeats_it(smollm) -> None:
    base = await answer(smollm, None, "base")
    one = await answer(smollm, "one", "one")
    two = await answer(smollm, "two", "two")
    assert len({base, one, two}) == 3, (base, one, two)
    assert await answer(smollm, "one", "one-again") == one
    assert await answer(smollm, None, "base-again") == base  # base output is untouched


async def test_a_third_adapter_evicts_the_least_recent_and_reloads_the_same(smollm) -> None:
    first = {a: await answer(smollm, a, f"first-{a}") for a in ("one", "two")}
    loads = smollm.adapters.loads
    three = await answer(smollm, "three", "three")  # evicts "one" (least recent)
    assert sorted(smollm.adapters.loaded) == ["three", "two"]
    assert await answer(smollm, "one", "one-reloaded") == first["one"]  # evicts "two"
    assert smollm.adapters.loads == loads + 2
    assert sorted(smollm.adapters.loaded) == ["one", "three"]
    assert three not in first.values()


async def test_a_mixed_batch_matches_one_sequence_per_adapter(smollm) -> None:
    engine = smollm.engine
    ids = torch.tensor([engine.encode(GenerationRequest("x", messages=list(QUESTION)))] * 3)
    rows = ["one", "three", None]
    with torch.inference_mode():
        model, kwargs = engine._lora.generate_target(rows)
        mixed = model(input_ids=ids, **kwargs).logits[:, -1]
        for i, adapter in enumerate(rows):
            model, kwargs = engine._lora.generate_target([adapter])
            alone = model(input_ids=ids[i:i + 1], **kwargs).logits[0, -1]
            assert torch.allclose(mixed[i], alone, atol=1e-4)
    assert not torch.allclose(mixed[0], mixed[2], atol=1e-2)  # the adapter mattered


async def test_concurrent_requests_with_different_adapters_answer_as_alone(smollm) -> None:
    """The batch loop puts them in the same steps; each still runs with its own adapter."""
    order = ["one", None, "two"]
    alone = [await answer(smollm, a, f"alone-{a}") for a in order]
    together = await asyncio.gather(*(answer(smollm, a, f"together-{a}") for a in order))
    assert list(together) == alone

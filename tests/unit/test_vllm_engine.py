"""VLLMTextEngine against a fake AsyncLLM (no vLLM, no GPU; see vllm_fakes): importing,
starting and stopping, streaming, sampling parameters."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from deployments.engines.base import TextEngine
from deployments.engines.registry import create_text_engine
from deployments.engines.vllm_engine import (
    VLLMTextEngine,
)
from deployments.llm import LLMDeployment
from serve_app.settings import ModelConfig
from serve_app.errors import InferenceFailed, InvalidRequest
from tests.unit.vllm_fakes import (
    CHAT_PROMPT_TOKENS,
    REPO,
    FakeAsyncLLM,
    FakeTokenizer,
    RecordedSamplingParams,
    chat,
    raw,
    started_engine,
    vllm_config,
)


# --------------------------------------------------------------------------- import & shape


def test_importing_the_module_never_imports_vllm():
    # A fresh interpreter with an import hook that records any attempt to import vllm,
    # so the check holds whether or not vllm is installed where the tests run.
    code = textwrap.dedent(
        """
        import sys
        attempts = []
        class Recorder:
            def find_spec(self, name, path=None, target=None):
                if name == "vllm" or name.startswith("vllm."):
                    attempts.append(name)
                return None
        sys.meta_path.insert(0, Recorder())
        from deployments.engines import vllm_engine
        from deployments.engines.registry import create_text_engine
        from serve_app.settings import VLLMEngineConfig
        cfg = VLLMEngineConfig(model="/m", tensor_parallel_size=2)
        create_text_engine("m", cfg)
        vllm_engine.placement_bundles(cfg)
        loaded = [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]
        print(attempts, loaded)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] []"


def test_registry_builds_the_vllm_engine_without_starting_it():
    engine = create_text_engine("qwen", vllm_config(max_model_len=2048))
    assert isinstance(engine, VLLMTextEngine)
    assert isinstance(engine, TextEngine)
    assert engine.context_length == 2048
    assert engine.active_requests() == 0


async def test_start_reads_context_length_and_tokenizer_from_the_engine():
    engine, fake = await started_engine(max_model_len=4096)
    assert engine.context_length == 4096
    assert fake.engine_args["model"] == "/models/fake"
    assert fake.engine_args["served_model_name"] == "fake-model"


async def test_start_accepts_an_async_get_tokenizer():
    class OlderAsyncLLM(FakeAsyncLLM):
        async def get_tokenizer(self):  # older vLLM releases
            return self.tokenizer

    engine = VLLMTextEngine(
        "m", vllm_config(), engine_factory=lambda args: OlderAsyncLLM(args),
        sampling_params_factory=RecordedSamplingParams,
    )
    await engine.start()
    outputs = [o async for o in engine.generate(chat())]
    assert "".join(o.text for o in outputs) == "Hello big wide world"


async def test_generate_before_start_fails_with_a_named_error():
    engine = VLLMTextEngine("m", vllm_config(), engine_factory=lambda a: FakeAsyncLLM(a))
    with pytest.raises(InferenceFailed):
        await anext(engine.generate(chat()))


async def test_shutdown_stops_the_engine():
    engine, fake = await started_engine()
    await engine.shutdown()
    assert fake.shutdown_calls == 1
    await engine.shutdown()  # idempotent
    assert fake.shutdown_calls == 1


# --------------------------------------------------------------------------- streaming


async def test_streams_deltas_including_merged_multi_token_deltas():
    engine, fake = await started_engine()
    outputs = [o async for o in engine.generate(chat())]

    assert [(o.text, o.num_tokens, o.finish_reason) for o in outputs] == [
        ("Hello", 1, None),
        (" big wide", 2, None),
        (" world", 1, "stop"),
    ]
    assert {o.prompt_tokens for o in outputs} == {CHAT_PROMPT_TOKENS}
    assert engine.active_requests() == 0


async def test_chat_messages_go_through_the_chat_template_once():
    engine, fake = await started_engine()
    [o async for o in engine.generate(chat())]

    [call] = fake.tokenizer.template_calls
    assert call["add_generation_prompt"] is True
    assert call["tokenize"] is False
    assert call["conversation"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi there"},
    ]
    # vLLM receives the token ids (no second tokenization) without an extra BOS.
    [submission] = fake.submitted
    assert submission.prompt == {"prompt_token_ids": list(range(100, 100 + CHAT_PROMPT_TOKENS))}


async def test_a_conversation_the_chat_template_refuses_is_an_invalid_request():
    engine, fake = await started_engine(tokenizer=FakeTokenizer(alternating_roles_only=True))
    with pytest.raises(InvalidRequest) as err:
        await anext(engine.generate(chat()))  # starts with a system turn
    assert err.value.status == 400 and err.value.param == "messages"
    assert "roles must alternate" in err.value.message
    assert fake.submitted == []
    assert engine.active_requests() == 0


async def test_raw_prompt_is_tokenized_as_is_with_special_tokens():
    engine, fake = await started_engine()
    outputs = [o async for o in engine.generate(raw("once upon a time"))]
    assert fake.tokenizer.template_calls == []
    assert fake.submitted[0].prompt == {"prompt_token_ids": [1, 100, 101, 102, 103]}
    assert outputs[-1].prompt_tokens == 5


async def test_a_native_prompt_to_a_chat_model_is_one_user_turn_unless_raw():
    tokenizer = FakeTokenizer()
    tokenizer.chat_template = "{{ messages }}"  # a chat model
    engine, fake = await started_engine(tokenizer=tokenizer)
    [o async for o in engine.generate(raw("tell me a story"))]
    assert tokenizer.template_calls[0]["conversation"] == [{"role": "user", "content": "tell me a story"}]
    request = raw("once upon a time", request_id="r2")
    request.raw = True
    [o async for o in engine.generate(request)]
    assert len(tokenizer.template_calls) == 1
    assert fake.submitted[1].prompt == {"prompt_token_ids": [1, 100, 101, 102, 103]}


async def test_long_prompts_are_tokenized_off_the_event_loop():
    engine, fake = await started_engine(max_model_len=10_000)
    prompt = "word " * 2000  # > 8192 characters
    outputs = [o async for o in engine.generate(raw(prompt, max_tokens=4))]
    assert outputs[-1].prompt_tokens == 2001


async def test_usage_reaches_the_deployment_exactly():
    engine, fake = await started_engine(script=[["a"], ["b", "c", "d"], ["e"]], finish="length")
    model = ModelConfig.model_validate(
        {"id": "qwen", "engine": {"type": "vllm", "model": "/models/fake"}}
    )
    deployment = LLMDeployment(model, engine=engine)
    chunk = await deployment.complete(chat(max_tokens=5))

    assert chunk.text == "abcde"
    assert chunk.finish_reason == "length"
    assert chunk.completion_tokens == 5
    assert chunk.prompt_tokens == CHAT_PROMPT_TOKENS


@pytest.mark.parametrize("vllm_reason,ours", [("stop", "stop"), ("length", "length"), ("abort", "abort")])
async def test_finish_reasons_are_mapped(vllm_reason, ours):
    engine, _ = await started_engine(script=[["x"]], finish=vllm_reason)
    outputs = [o async for o in engine.generate(chat())]
    assert outputs[-1].finish_reason == ours


@pytest.mark.parametrize("stop_reason,reported", [("\n\n", "\n\n"), (2, None), (None, None)])
async def test_the_matched_stop_string_is_reported(stop_reason, reported):
    engine, _ = await started_engine(script=[["x"]], finish="stop", stop_reason=stop_reason)
    outputs = [o async for o in engine.generate(chat())]
    assert outputs[-1].stop_sequence == reported  # a stop token id is not a stop string


async def test_an_engine_error_finish_is_raised_not_reported_as_stop():
    engine, _ = await started_engine(script=[["x"]], finish="error")
    with pytest.raises(InferenceFailed):
        [o async for o in engine.generate(chat())]
    assert engine.active_requests() == 0


# --------------------------------------------------------------------------- sampling


async def test_sampling_params_are_built_for_delta_streaming():
    engine, fake = await started_engine()
    request = chat(max_tokens=5, temperature=0.0, top_p=0.9, seed=7, stop=("\n\n",))
    [o async for o in engine.generate(request)]

    [submission] = fake.submitted
    assert submission.request_id == "r1"
    assert submission.sampling_params.kwargs == {
        "max_tokens": 5,
        "temperature": 0.0,
        "top_p": 0.9,
        "seed": 7,
        "stop": ["\n\n"],
        "output_kind": "DELTA",
    }


async def test_without_max_tokens_the_rest_of_the_context_is_allowed():
    engine, fake = await started_engine(max_model_len=64)
    [o async for o in engine.generate(chat(max_tokens=None))]
    kwargs = fake.submitted[0].sampling_params.kwargs
    assert kwargs["max_tokens"] == 64 - CHAT_PROMPT_TOKENS
    assert "seed" not in kwargs and "stop" not in kwargs


async def test_sampling_params_the_engine_refuses_are_an_invalid_request():
    def refusing(**kwargs):
        raise ValueError("top_p must be in (0, 1], got 0.0.")

    engine = VLLMTextEngine(
        "m", vllm_config(), engine_factory=lambda a: FakeAsyncLLM(a),
        sampling_params_factory=refusing,
    )
    await engine.start()
    with pytest.raises(InvalidRequest) as err:
        await anext(engine.generate(chat(top_p=0.0)))
    assert err.value.status == 400
    assert engine.active_requests() == 0

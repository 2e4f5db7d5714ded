"""VLLMTextEngine against a fake AsyncLLM (no vLLM, no GPU).

The fake keeps the parts of vLLM's contract the engine relies on: ``generate`` is an
async generator of DELTA ``RequestOutput``-like objects (a step that produced several
tokens before the consumer read arrives as one merged delta), it refuses an over-long
prompt with a ValueError at submission, ``abort`` ends a running stream with a final
``finish_reason="abort"`` output, and closing the generator aborts the request inside
the engine.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any, Optional

import jinja2
import pytest

from deployments.engines.base import TextEngine, create_text_engine
from deployments.engines.vllm_engine import (
    VLLMTextEngine,
    build_engine_args,
    placement_bundles,
)
from deployments.llm import LLMDeployment
from serve_app.settings import ConfigError, ModelConfig, VLLMEngineConfig
from serve_app.errors import ContextLengthExceeded, InferenceFailed, InvalidRequest
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- the fake


class FakeTokenizer:
    """Whitespace 'tokenizer'; its chat template writes BOS itself, like real ones."""

    def __init__(self, bos: Optional[int] = 1, alternating_roles_only: bool = False) -> None:
        self.bos = bos
        self.alternating_roles_only = alternating_roles_only
        self.template_calls: list[dict[str, Any]] = []

    def apply_chat_template(self, conversation, *, tokenize, add_generation_prompt):
        self.template_calls.append(
            {"conversation": conversation, "tokenize": tokenize,
             "add_generation_prompt": add_generation_prompt}
        )
        if self.alternating_roles_only and conversation[0]["role"] != "user":
            # what a template's raise_exception() does
            raise jinja2.TemplateError("Conversation roles must alternate user/assistant/...")
        text = " ".join(f"<|{m['role']}|> {m['content']}" for m in conversation)
        if add_generation_prompt:
            text += " <|assistant|>"
        return "<s> " + text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [100 + i for i, _ in enumerate(text.split())]
        if add_special_tokens and self.bos is not None:
            ids.insert(0, self.bos)
        return ids


class FakeCompletion:
    def __init__(self, text: str, token_ids: list[int], finish_reason: Optional[str]):
        self.index = 0
        self.text = text
        self.token_ids = token_ids
        self.finish_reason = finish_reason
        self.stop_reason: Any = None  # vLLM: the matched stop string, a stop token id, or None


class FakeRequestOutput:
    def __init__(self, request_id, prompt_token_ids, completion: FakeCompletion):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [completion]
        self.finished = completion.finish_reason is not None


class FakeModelConfig:
    def __init__(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len


class Submission:
    def __init__(self, prompt, sampling_params, request_id, lora_request=None) -> None:
        self.prompt = prompt
        self.sampling_params = sampling_params
        self.request_id = request_id
        self.lora_request = lora_request


class FakeLoRARequest:
    """vllm.lora.request.LoRARequest's fields."""

    def __init__(self, lora_name: str, lora_int_id: int, lora_path: str) -> None:
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class RecordedSamplingParams:
    """Stands in for vllm.SamplingParams: keeps the keyword arguments it was built with."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class FakeAsyncLLM:
    """The AsyncLLM surface VLLMTextEngine uses.

    ``script``: the steps the engine produces for a request. Each step is the list of
    tokens generated before the consumer's next read, so it arrives as one merged delta.
    ``finish``: the reason on the last step; None keeps the request running until aborted.
    """

    def __init__(
        self,
        engine_args: dict[str, Any],
        *,
        max_model_len: int = 64,
        script: Optional[list[list[str]]] = None,
        finish: Optional[str] = "stop",
        emits_abort_output: bool = True,
        stop_reason: Any = None,
        reject_with: Optional[BaseException] = None,
        tokenizer: Optional[FakeTokenizer] = None,
    ) -> None:
        self.engine_args = engine_args
        self.model_config = FakeModelConfig(max_model_len)
        self.tokenizer = tokenizer or FakeTokenizer()
        self.script = script if script is not None else [["Hello"], [" big", " wide"], [" world"]]
        self.finish = finish
        self.emits_abort_output = emits_abort_output
        self.stop_reason = stop_reason
        self.reject_with = reject_with
        self.submitted: list[Submission] = []
        self.aborted: list[str] = []
        self.closed_by_consumer: list[str] = []
        self.running: dict[str, asyncio.Event] = {}
        self.shutdown_calls = 0
        self.loras: dict[int, FakeLoRARequest] = {}  # lora_int_id -> request (add_lora)

    def get_tokenizer(self) -> FakeTokenizer:
        return self.tokenizer

    def _output(self, request_id, prompt_ids, tokens, finish):
        ids = [1000 + len(t) for t in tokens]
        return FakeRequestOutput(request_id, prompt_ids, FakeCompletion("".join(tokens), ids, finish))

    async def add_lora(self, lora_request: FakeLoRARequest) -> bool:
        """Like vLLM: the adapter's files are read now; a rank above max_lora_rank fails."""
        config = Path(lora_request.lora_path) / "adapter_config.json"
        if not config.is_file():
            raise ValueError(f"Loading lora {lora_request.lora_name} failed: No adapter found "
                             f"for {lora_request.lora_path}")
        rank = json.loads(config.read_text())["r"]
        if rank > self.engine_args.get("max_lora_rank", 16):
            raise ValueError(f"LoRA rank {rank} is greater than max_lora_rank "
                             f"{self.engine_args.get('max_lora_rank', 16)}.")
        self.loras[lora_request.lora_int_id] = lora_request
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        return self.loras.pop(lora_id, None) is not None

    async def list_loras(self) -> set[int]:
        return set(self.loras)

    async def generate(self, prompt, sampling_params, request_id, lora_request=None):
        self.submitted.append(Submission(prompt, sampling_params, request_id, lora_request))
        if lora_request is not None and lora_request.lora_int_id not in self.loras:
            raise ValueError(f"LoRA {lora_request.lora_name} is not loaded")
        prompt_ids = prompt["prompt_token_ids"]
        if self.reject_with is not None:
            raise self.reject_with
        if len(prompt_ids) >= self.model_config.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {len(prompt_ids)}) is longer than the maximum "
                f"model length of {self.model_config.max_model_len}."
            )
        aborted = asyncio.Event()
        self.running[request_id] = aborted
        try:
            for i, step in enumerate(self.script):
                await asyncio.sleep(0)  # the engine produces asynchronously
                if aborted.is_set() and self.emits_abort_output:
                    yield self._output(request_id, prompt_ids, [], "abort")
                    return
                last = i == len(self.script) - 1
                reason = self.finish if last else None
                output = self._output(request_id, prompt_ids, step, reason)
                if reason is not None:
                    output.outputs[0].stop_reason = self.stop_reason
                yield output
                if reason is not None:
                    return
            await aborted.wait()
            if self.emits_abort_output:
                yield self._output(request_id, prompt_ids, [], "abort")
        except (GeneratorExit, asyncio.CancelledError):
            self.closed_by_consumer.append(request_id)
            raise
        finally:
            self.running.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        event = self.running.get(request_id)
        if event is not None:
            event.set()

    def shutdown(self) -> None:
        self.shutdown_calls += 1


# --------------------------------------------------------------------------- helpers


def vllm_config(**overrides: Any) -> VLLMEngineConfig:
    return VLLMEngineConfig(**{"model": "/models/fake", **overrides})


async def started_engine(
    config: Optional[VLLMEngineConfig] = None, **fake_kwargs: Any
) -> tuple[VLLMTextEngine, FakeAsyncLLM]:
    fakes: list[FakeAsyncLLM] = []

    def factory(engine_args: dict[str, Any]) -> FakeAsyncLLM:
        fakes.append(FakeAsyncLLM(engine_args, **fake_kwargs))
        return fakes[-1]

    engine = VLLMTextEngine(
        "fake-model",
        config or vllm_config(),
        engine_factory=factory,
        sampling_params_factory=RecordedSamplingParams,
        lora_request_factory=FakeLoRARequest,
    )
    await engine.start()
    return engine, fakes[0]


def chat(request_id: str = "r1", max_tokens: Optional[int] = 8, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
        messages=[ChatMessage("system", "be brief"), ChatMessage("user", "hi there")],
    )


def raw(prompt: str, request_id: str = "r1", max_tokens: Optional[int] = 8) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id, sampling=SamplingParams(max_tokens=max_tokens), prompt=prompt
    )


async def until(condition, timeout_s: float = 2.0) -> None:
    """Wait for ``condition()`` to hold, failing after a deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0)


# the chat template renders "<s> <|system|> be brief <|user|> hi there <|assistant|>"
CHAT_PROMPT_TOKENS = 8


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
        from deployments.engines.base import create_text_engine
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


# --------------------------------------------------------------------------- context length


async def test_prompt_plus_max_tokens_over_the_context_is_refused_before_submitting():
    engine, fake = await started_engine(max_model_len=16)
    # raw prompt: BOS + 10 words = 11 tokens; 11 + 5 fits exactly, 11 + 6 does not
    prompt = " ".join(["w"] * 10)
    with pytest.raises(ContextLengthExceeded) as err:
        await anext(engine.generate(raw(prompt, max_tokens=6)))
    assert err.value.status == 400 and err.value.code == "CONTEXT_LENGTH_EXCEEDED"
    assert err.value.details == {"context_length": 16, "prompt_tokens": 11, "max_tokens": 6}
    assert fake.submitted == []
    assert engine.active_requests() == 0

    outputs = [o async for o in engine.generate(raw(prompt, max_tokens=5))]
    assert outputs[-1].finish_reason == "stop"


async def test_a_prompt_that_fills_the_context_is_refused_even_without_max_tokens():
    engine, fake = await started_engine(max_model_len=16)
    with pytest.raises(ContextLengthExceeded):
        await anext(engine.generate(raw(" ".join(["w"] * 15), max_tokens=None)))
    assert fake.submitted == []


async def test_vllms_own_length_refusal_becomes_context_length_exceeded():
    engine, fake = await started_engine(
        reject_with=ValueError("The decoder prompt (length 9) is longer than the maximum model length of 8.")
    )
    with pytest.raises(ContextLengthExceeded) as err:
        await anext(engine.generate(chat()))
    assert err.value.status == 400
    assert len(fake.submitted) == 1
    assert engine.active_requests() == 0


async def test_a_wrapped_refusal_is_recognised_by_its_cause():
    class EngineGenerateError(Exception):
        pass

    try:
        raise EngineGenerateError() from ValueError("prompt too long")
    except EngineGenerateError as exc:
        wrapped = exc
    engine, _ = await started_engine(reject_with=wrapped)
    with pytest.raises(ContextLengthExceeded):
        await anext(engine.generate(chat()))


async def test_a_refusal_naming_a_parameter_is_an_invalid_request_for_that_field():
    class VLLMValidationError(ValueError):
        def __init__(self, message, *, parameter=None, value=None):
            super().__init__(message)
            self.parameter = parameter
            self.value = value

    engine, _ = await started_engine(
        reject_with=VLLMValidationError("logit_bias out of vocab", parameter="logit_bias")
    )
    with pytest.raises(InvalidRequest) as err:
        await anext(engine.generate(chat()))
    assert not isinstance(err.value, ContextLengthExceeded)
    assert err.value.param == "logit_bias"


async def test_an_engine_crash_is_not_disguised_as_a_bad_request():
    engine, _ = await started_engine(reject_with=RuntimeError("CUDA error"))
    with pytest.raises(RuntimeError):
        await anext(engine.generate(chat()))
    assert engine.active_requests() == 0


async def test_an_empty_prompt_is_an_invalid_request():
    engine, fake = await started_engine(tokenizer=FakeTokenizer(bos=None))
    with pytest.raises(InvalidRequest):
        await anext(engine.generate(raw("")))
    assert fake.submitted == []


async def test_a_request_id_already_running_is_refused():
    engine, _ = await started_engine(finish=None)
    first = engine.generate(chat("same"))
    await anext(first)
    with pytest.raises(InvalidRequest):
        await anext(engine.generate(chat("same")))
    assert engine.active_requests() == 1
    await first.aclose()
    assert engine.active_requests() == 0


# --------------------------------------------------------------------------- cancellation


async def test_closing_the_stream_aborts_the_engine_request():
    engine, fake = await started_engine(finish=None)  # runs until aborted
    stream = engine.generate(chat("r-close"))
    first = await anext(stream)
    assert first.text == "Hello"
    assert engine.active_requests() == 1

    await stream.aclose()

    assert fake.aborted == ["r-close"]
    assert fake.closed_by_consumer == ["r-close"]
    assert fake.running == {}
    assert engine.active_requests() == 0


async def test_cancelling_the_consuming_task_aborts_the_engine_request():
    engine, fake = await started_engine(finish=None)
    received: list[str] = []

    async def consume():
        async for out in engine.generate(chat("r-cancel")):
            received.append(out.text)

    task = asyncio.create_task(consume())
    await until(lambda: len(received) == 3 and "r-cancel" in fake.running)
    assert engine.active_requests() == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert fake.aborted == ["r-cancel"]
    assert fake.running == {}
    assert engine.active_requests() == 0


async def test_abort_from_outside_ends_the_stream_with_abort():
    engine, fake = await started_engine(finish=None)
    stream = engine.generate(chat("r-abort"))
    texts = [(await anext(stream)).text for _ in range(3)]
    assert texts == ["Hello", " big wide", " world"]

    await engine.abort("r-abort")
    last = await anext(stream)

    assert last.finish_reason == "abort"
    assert last.num_tokens == 0
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert engine.active_requests() == 0
    assert fake.aborted == ["r-abort"]  # the final ABORT output needs no second abort


async def test_abort_ends_the_stream_even_if_vllm_sends_no_abort_output():
    engine, fake = await started_engine(
        script=[[f" t{i}"] for i in range(50)], finish=None, emits_abort_output=False
    )
    stream = engine.generate(chat("r-old"))
    await anext(stream)
    await engine.abort("r-old")
    last = await anext(stream)
    assert last.finish_reason == "abort"
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    assert engine.active_requests() == 0
    assert fake.running == {}


async def test_abort_of_an_unknown_request_is_a_no_op():
    engine, fake = await started_engine()
    await engine.abort("nobody")
    assert fake.aborted == []


async def test_the_deployment_reports_an_abort_as_cancelled():
    engine, fake = await started_engine(finish=None)
    model = ModelConfig.model_validate({"id": "q", "engine": {"type": "vllm", "model": "/m"}})
    deployment = LLMDeployment(model, engine=engine)
    chunks = []
    async for chunk in deployment.stream(chat("r-dep")):
        chunks.append(chunk)
        if len(chunks) == 1:
            await engine.abort("r-dep")
    assert chunks[-1].finish_reason == "cancelled"
    assert deployment.stats()["active_requests"] == 0


# --------------------------------------------------------------------------- tensor parallel


async def test_tensor_parallel_uses_the_ray_executor_in_the_replica_placement_group():
    engine, fake = await started_engine(vllm_config(tensor_parallel_size=2))
    assert fake.engine_args["tensor_parallel_size"] == 2
    assert fake.engine_args["distributed_executor_backend"] == "ray"


def test_single_gpu_leaves_the_executor_to_vllm():
    args = build_engine_args("m", vllm_config())
    assert args["tensor_parallel_size"] == 1
    assert "distributed_executor_backend" not in args


def test_engine_args_carry_the_typed_fields_and_pass_extras_through():
    cfg = vllm_config(
        max_model_len=8192, dtype="bfloat16", enforce_eager=True, gpu_memory_utilization=0.8,
        extra_engine_args={"enable_prefix_caching": True},
    )
    args = build_engine_args("qwen", cfg)
    assert args == {
        "model": "/models/fake",
        "served_model_name": "qwen",
        "tensor_parallel_size": 1,
        "gpu_memory_utilization": 0.8,
        "dtype": "bfloat16",
        "enforce_eager": True,
        "max_model_len": 8192,
        "enable_prefix_caching": True,
    }


def test_extra_engine_args_may_not_override_a_typed_field():
    cfg = vllm_config(tensor_parallel_size=2, extra_engine_args={"tensor_parallel_size": 4})
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        VLLMTextEngine("m", cfg)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_placement_bundles_give_one_gpu_bundle_per_rank(tp):
    bundles = placement_bundles(vllm_config(tensor_parallel_size=tp), num_cpus_per_bundle=2)
    assert bundles == [{"GPU": 1, "CPU": 2}] * tp
    bundles[0]["CPU"] = 99  # each bundle is its own dict
    assert all(b["CPU"] == 2 for b in bundles[1:])


def test_placement_bundles_are_valid_deployment_options():
    from serve_app.settings import DeploymentOptions

    options = DeploymentOptions(
        placement_group_bundles=placement_bundles(vllm_config(tensor_parallel_size=2)),
        ray_actor_options={"num_cpus": 1, "num_gpus": 0},
    ).to_serve()
    assert options["placement_group_bundles"] == [{"GPU": 1, "CPU": 1}] * 2
    assert options["placement_group_strategy"] == "STRICT_PACK"

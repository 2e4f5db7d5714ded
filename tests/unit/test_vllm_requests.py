"""VLLMTextEngine against a fake AsyncLLM (no vLLM, no GPU; see vllm_fakes): requests the
engine refuses (context length, bad parameters, duplicates) and cancellation."""

from __future__ import annotations

import asyncio

import pytest

from deployments.llm import LLMDeployment
from serve_app.settings import ModelConfig
from serve_app.errors import ContextLengthExceeded, InvalidRequest
from tests.unit.vllm_fakes import (
    FakeTokenizer,
    chat,
    raw,
    started_engine,
    until,
)


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

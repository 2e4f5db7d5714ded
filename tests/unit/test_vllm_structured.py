"""The vLLM adapter's agent paths against the fake with vLLM's surface: structured outputs,
forced and auto tool calls, logprobs, penalties and logit bias."""

from __future__ import annotations

import json
import sys
import types
from typing import Any

import pytest

from deployments.engines.vllm_engine import build_sampling_kwargs
from deployments.engines.vllm_structured import to_vllm_structured
from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import (
    ChatMessage,
    GenerationRequest,
    NamedTool,
    ResponseFormat,
    SamplingParams,
    ToolSpec,
    merge_tool_call_deltas,
)
from tests.unit.byte_tokenizer import byte_tokenizer
from tests.unit.test_vllm_engine import FakeAsyncLLM, FakeTokenizer, started_engine

pytestmark = pytest.mark.asyncio

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
WEATHER = ToolSpec("weather", "Weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"]})


def req(**kw: Any) -> GenerationRequest:
    sampling = SamplingParams(max_tokens=8, **kw.pop("sampling", {}))
    return GenerationRequest("r1", sampling, messages=[ChatMessage("user", "hi")], **kw)


async def outputs(engine, request):
    return [o async for o in engine.generate(request)]


async def test_constraints_penalties_bias_and_logprobs_reach_sampling_params():
    engine, fake = await started_engine()
    request = req(response_format=ResponseFormat("json_schema", SCHEMA, "s"),
                  sampling={"logprobs": 2, "presence_penalty": 0.5, "frequency_penalty": -1.0,
                            "logit_bias": {5: 3.0}})
    await outputs(engine, request)
    kwargs = fake.submitted[0].sampling_params.kwargs
    assert kwargs["structured_outputs"] == {"json": SCHEMA}
    assert (kwargs["logprobs"], kwargs["presence_penalty"], kwargs["frequency_penalty"]) == (2, 0.5, -1.0)
    assert kwargs["logit_bias"] == {5: 3.0}
    assert build_sampling_kwargs(req(response_format=ResponseFormat("json_object")), 8)[
        "structured_outputs"] == {"json_object": True}
    forced = build_sampling_kwargs(req(tools=(WEATHER,), tool_choice=NamedTool("weather")), 8)
    assert forced["structured_outputs"] == {"json": WEATHER.parameters}
    plain = build_sampling_kwargs(req(), 8)
    assert not {"structured_outputs", "logprobs", "logit_bias"} & set(plain)


def test_bad_fields_are_400s_naming_them_before_vllm_sees_them():
    tok = byte_tokenizer()
    with pytest.raises(InvalidRequest) as err:
        build_sampling_kwargs(req(sampling={"logit_bias": {999: 1.0}}), 8, tok)
    assert err.value.param == "logit_bias" and "999" in str(err.value)
    bad = ResponseFormat("json_schema", {"type": "array", "uniqueItems": True}, "s")
    with pytest.raises(InvalidRequest, match="uniqueItems"):
        build_sampling_kwargs(req(response_format=bad), 8, tok)
    with pytest.raises(InvalidRequest) as err:
        build_sampling_kwargs(req(sampling={"logprobs": 21}), 8)
    assert err.value.param == "top_logprobs"


def test_the_default_factory_builds_vllms_own_params(monkeypatch):
    made: list = []

    class StructuredOutputsParams:
        def __init__(self, **kw):
            made.append(kw)

    module = types.ModuleType("vllm.sampling_params")
    module.StructuredOutputsParams = StructuredOutputsParams
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.sampling_params", module)
    out = to_vllm_structured({"max_tokens": 3, "structured_outputs": {"json": SCHEMA}})
    assert isinstance(out["structured_outputs"], StructuredOutputsParams) and made == [{"json": SCHEMA}]
    del module.StructuredOutputsParams  # an older vLLM: guided_decoding
    module.GuidedDecodingParams = StructuredOutputsParams
    out = to_vllm_structured({"structured_outputs": {"json_object": True}})
    assert set(out) == {"guided_decoding"} and made[-1] == {"json_object": True}


def test_the_engine_wide_structured_outputs_config_becomes_vllms_own(monkeypatch):
    from deployments.engines.vllm_structured import to_vllm_engine_args

    class StructuredOutputsConfig:  # vllm.config's: a config object, not a dict
        def __init__(self, backend="auto", disable_any_whitespace=False):
            self.backend, self.disable_any_whitespace = backend, disable_any_whitespace

    module = types.ModuleType("vllm.config")
    module.StructuredOutputsConfig = StructuredOutputsConfig
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setitem(sys.modules, "vllm.config", module)
    args = {"model": "/m", "structured_outputs_config": {"backend": "guidance", "disable_any_whitespace": True}}
    config = to_vllm_engine_args(args)["structured_outputs_config"]
    assert (config.backend, config.disable_any_whitespace) == ("guidance", True)
    assert isinstance(args["structured_outputs_config"], dict)  # the caller's dict is left alone


async def test_a_forced_call_streams_as_tool_call_deltas():
    script = [['{"ci'], ['ty": "Par'], ['is"}']]
    engine, fake = await started_engine(script=script, max_model_len=512)
    outs = await outputs(engine, req(tools=(WEATHER,), tool_choice=NamedTool("weather")))
    assert "".join(o.text for o in outs) == ""
    assert outs[-1].finish_reason == "tool_calls"
    deltas = [d for o in outs for d in o.tool_calls or ()]
    assert deltas[0].name == "weather" and len(deltas) == 4
    [call] = merge_tool_call_deltas(deltas)
    assert json.loads(call.arguments) == {"city": "Paris"}
    # The tools were shown to the model (this template cannot render them itself).
    assert "weather" in fake.tokenizer.template_calls[0]["conversation"][0]["content"]


async def test_auto_mode_parses_hermes_calls_out_of_the_text():
    script = [["Sure. <tool_"], ['call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>']]
    engine, _ = await started_engine(script=script, max_model_len=512)
    outs = await outputs(engine, req(tools=(WEATHER,)))
    assert "".join(o.text for o in outs) == "Sure. "
    assert outs[-1].finish_reason == "tool_calls"
    [call] = merge_tool_call_deltas([d for o in outs for d in o.tool_calls or ()])
    assert call.name == "weather" and json.loads(call.arguments) == {"city": "Oslo"}


class _Logprob:
    def __init__(self, logprob: float, rank: int, decoded_token: str) -> None:
        self.logprob, self.rank, self.decoded_token = logprob, rank, decoded_token


class LogprobLLM(FakeAsyncLLM):
    """Adds vLLM's per-token logprob dicts: the sampled token (rank 2 here) plus the top 1."""

    def _output(self, request_id, prompt_ids, tokens, finish):
        out = super()._output(request_id, prompt_ids, tokens, finish)
        completion = out.outputs[0]
        completion.logprobs = [
            {tid: _Logprob(-1.5, 2, tok), 7: _Logprob(-0.2, 1, "best")}
            for tid, tok in zip(completion.token_ids, tokens)
        ]
        return out


async def test_logprobs_come_back_per_token_in_troupes_shape():
    fakes: list = []
    from deployments.engines.vllm_engine import VLLMTextEngine
    from tests.unit.test_vllm_engine import RecordedSamplingParams, vllm_config

    def factory(args):
        fakes.append(LogprobLLM(args))
        return fakes[-1]

    engine = VLLMTextEngine("m", vllm_config(), engine_factory=factory,
                            sampling_params_factory=RecordedSamplingParams)
    await engine.start()
    outs = await outputs(engine, req(sampling={"logprobs": 1}))
    entries = [e for o in outs for e in o.logprobs or ()]
    assert [e.token for e in entries] == ["Hello", " big", " wide", " world"]
    assert entries[0].logprob == -1.5 and entries[0].top == (("best", 7, -0.2),)
    plain = await outputs(engine, GenerationRequest("r2", SamplingParams(max_tokens=8), prompt="x"))
    assert all(o.logprobs is None for o in plain)


class _DecodingTokenizer(FakeTokenizer):
    def __len__(self) -> int:
        return 2000

    def decode(self, ids) -> str:
        return " ".join(f"t{i}" for i in ids)


async def test_token_id_prompts_are_checked_and_echoed_by_the_engine():
    engine, fake = await started_engine(tokenizer=_DecodingTokenizer())
    request = GenerationRequest("r1", SamplingParams(max_tokens=4, echo=True), prompt_token_ids=(5, 6))
    outs = await outputs(engine, request)
    assert outs[0].text == "t5 t6" and outs[0].num_tokens == 0
    assert fake.submitted[0].prompt == {"prompt_token_ids": [5, 6]}
    with pytest.raises(InvalidRequest, match="2000") as err:
        await outputs(engine, GenerationRequest("r2", SamplingParams(max_tokens=4), prompt_token_ids=(1, 2000)))
    assert err.value.param == "prompt"


def test_echo_with_logprobs_is_a_400_naming_echo_on_vllm():
    with pytest.raises(InvalidRequest) as err:
        build_sampling_kwargs(req(sampling={"logprobs": 1, "prompt_logprobs": 1, "echo": True}), 8)
    assert err.value.param == "echo"

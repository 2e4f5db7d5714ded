"""Field-by-field translation of the agent vocabulary (tools, tool turns, images,
structured output, logprobs, penalties, cached usage) to and from each provider's wire
format: requests built from internal requests, answers read from the recorded-shape
payloads in tests/fixtures/providers/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from deployments.engines.remote.anthropic import AnthropicTextEngine, build_messages_body
from deployments.engines.remote.anthropic_wire import JSON_TOOL
from deployments.engines.remote.gemini import GeminiTextEngine
from deployments.engines.remote.gemini_wire import build_generate_body
from deployments.engines.remote.openai import OpenAITextEngine, build_chat_body
from deployments.engines.remote.stream import StreamState
from deployments.engines.remote.wire_util import synth_call_id
from serve_app.errors import InvalidRequest
from serve_app.gateway.agent_checks import unsupported_field
from serve_app.protocol.internal import (
    ChatMessage,
    GenerationRequest,
    ImagePart,
    NamedTool,
    ResponseFormat,
    SamplingParams,
    TextPart,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    merge_tool_call_deltas,
)
from serve_app.settings import AnthropicEngineConfig, GeminiEngineConfig, OpenAIEngineConfig

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "providers"
PNG = "data:image/png;base64,iVBORw0KGgo="
WEATHER = ToolSpec("get_weather", "Weather of a city.",
                   {"type": "object", "properties": {"city": {"type": "string"}},
                    "required": ["city"]})
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def conversation() -> list[ChatMessage]:
    """A system turn, a user turn with an image, a tool call and its result."""
    return [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "What is this? Use a tool.",
                    parts=(TextPart("What is this? Use a tool."), ImagePart(PNG, "low"))),
        ChatMessage("assistant", "", tool_calls=(
            ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", '{"temp": 21}', tool_call_id="call_1"),
    ]


def agent_request(**changes: Any) -> GenerationRequest:
    return GenerationRequest("req-1", messages=conversation(), tools=(WEATHER,), **changes)


def read(engine: Any, events: list[Any]) -> tuple[list[Any], StreamState]:
    state = StreamState(request_id="req-1")
    outs = []
    for event in events:
        out = engine.on_event(event if isinstance(event, str) else json.dumps(event), state)
        if out is not None:
            outs.append(out)
    return outs, state


def calls_of(outputs: list[Any]) -> list[ToolCall]:
    return merge_tool_call_deltas([d for o in outputs for d in o.tool_calls or ()])


# ------------------------------------------------------------------ OpenAI / Azure


def test_openai_request_carries_every_agent_field() -> None:
    request = agent_request(
        tool_choice=NamedTool("get_weather"), parallel_tool_calls=False,
        response_format=ResponseFormat("json_schema", SCHEMA, "person", True),
        sampling=SamplingParams(logprobs=3, presence_penalty=0.5, frequency_penalty=-0.5,
                                logit_bias={50256: -100.0}))
    body = build_chat_body("gpt-x", request, 8192)
    user, assistant, tool = body["messages"][1:]
    assert user["content"] == [{"type": "text", "text": "What is this? Use a tool."},
                               {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}]
    assert assistant == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
    assert tool == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}
    assert body["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather of a city.",
        "parameters": WEATHER.parameters}}]
    assert body["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert body["parallel_tool_calls"] is False
    assert body["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "person", "schema": SCHEMA, "strict": True}}
    assert (body["logprobs"], body["top_logprobs"]) == (True, 3)
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, -0.5)
    assert body["logit_bias"] == {"50256": -100.0}


def test_openai_plain_request_sends_no_agent_fields() -> None:
    body = build_chat_body("gpt-x", GenerationRequest("r", messages=[ChatMessage("user", "hi")]),
                           8192)
    assert set(body) == {"model", "messages", "stream", "stream_options", "temperature", "top_p"}
    assert body["messages"] == [{"role": "user", "content": "hi"}]


def openai_engine() -> OpenAITextEngine:
    return OpenAITextEngine("m", OpenAIEngineConfig(type="openai", model="gpt-x"))


def test_openai_unary_tool_calls_and_cached_reasoning_usage() -> None:
    state = StreamState()
    (out,) = openai_engine().on_json(fixture("openai_chat_tool_call.json"), state)
    assert out.tool_calls == [
        ToolCallDelta(0, "call_a1", "get_weather", '{"city": "Paris"}'),
        ToolCallDelta(1, "call_b2", "get_time", '{"tz": "CET"}')]
    assert state.finish_reason == "tool_calls"
    assert (state.prompt_tokens, state.completion_tokens) == (82, 37)
    assert (state.cached_tokens, state.reasoning_tokens) == (64, 12)


def test_openai_streamed_tool_call_fragments() -> None:
    engine = openai_engine()
    outs, state = read(engine, fixture("openai_chat_stream_tool_call.json")["events"])
    assert calls_of(outs) == [ToolCall("call_a1", "get_weather", '{"city": "Paris"}')]
    assert state.done and state.finish_reason == "tool_calls"
    final = engine._final(state)
    assert (final.prompt_tokens, final.cached_tokens) == (82, 64)


def test_openai_logprobs() -> None:
    state = StreamState()
    (out,) = openai_engine().on_json(fixture("openai_chat_logprobs.json"), state)
    assert out.logprobs == [
        TokenLogprob("Hi", -1, -0.31, (("Hi", -1, -0.31), ("Hello", -1, -1.4))),
        TokenLogprob(" there", -1, -0.02, ((" there", -1, -0.02),))]


# ------------------------------------------------------------------ Anthropic


def test_anthropic_request_translates_tools_turns_and_images() -> None:
    body = build_messages_body("claude-x", agent_request(
        tool_choice="required", parallel_tool_calls=False), 1024)
    assert body["system"] == "Be brief."
    user, assistant, result = body["messages"]
    assert user == {"role": "user", "content": [
        {"type": "text", "text": "What is this? Use a tool."},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                     "data": "iVBORw0KGgo="}}]}
    assert assistant == {"role": "assistant", "content": [
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}]}
    assert result == {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "call_1", "content": '{"temp": 21}'}]}
    assert body["tools"] == [{"name": "get_weather", "description": "Weather of a city.",
                              "input_schema": WEATHER.parameters}]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}


@pytest.mark.parametrize("choice, wire", [
    ("auto", {"type": "auto"}), ("none", {"type": "none"}),
    (NamedTool("get_weather"), {"type": "tool", "name": "get_weather"})])
def test_anthropic_tool_choice(choice: Any, wire: dict[str, Any]) -> None:
    assert build_messages_body("c", agent_request(tool_choice=choice), 1)["tool_choice"] == wire


def test_anthropic_http_image_is_a_url_source_and_results_of_one_step_merge() -> None:
    messages = [ChatMessage("user", "x", parts=(ImagePart("https://example.com/a.png"),)),
                ChatMessage("assistant", "", tool_calls=(ToolCall("a", "f", "{}"),
                                                         ToolCall("b", "f", "{}"))),
                ChatMessage("tool", "1", tool_call_id="a"), ChatMessage("tool", "2", tool_call_id="b")]
    body = build_messages_body("c", GenerationRequest("r", messages=messages), 1)
    assert body["messages"][0]["content"] == [
        {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}]
    assert [b["tool_use_id"] for b in body["messages"][2]["content"]] == ["a", "b"]
    assert len(body["messages"]) == 3


def test_anthropic_json_schema_is_a_forced_tool() -> None:
    request = GenerationRequest("r", messages=[ChatMessage("user", "hi")],
                                response_format=ResponseFormat("json_schema", SCHEMA))
    body = build_messages_body("c", request, 1)
    assert body["tools"][0]["name"] == JSON_TOOL and body["tools"][0]["input_schema"] == SCHEMA
    assert body["tool_choice"] == {"type": "tool", "name": JSON_TOOL}


def anthropic_engine() -> AnthropicTextEngine:
    return AnthropicTextEngine("m", AnthropicEngineConfig(type="anthropic", model="c"))


def test_anthropic_unary_tool_use_and_cache_usage() -> None:
    state = StreamState()
    (out,) = anthropic_engine().on_json(fixture("anthropic_tool_use.json"), state)
    assert out.text == "I'll check the weather."
    assert out.tool_calls == [ToolCallDelta(0, "toolu_01A09q90qw90lq917835lq9", "get_weather",
                                            '{"city": "Paris"}')]
    assert state.finish_reason == "tool_calls"
    assert (state.prompt_tokens, state.cached_tokens) == (2120, 2000)


def test_anthropic_streamed_input_json_deltas() -> None:
    engine = anthropic_engine()
    outs, state = read(engine, fixture("anthropic_stream_tool_use.json")["events"])
    assert "".join(o.text for o in outs) == "Checking."
    assert calls_of(outs) == [ToolCall("toolu_01T1x1fJ34qAmk2tNTrN7Up6", "get_weather",
                                       '{"city": "Paris"}')]
    assert state.finish_reason == "tool_calls"
    assert (engine._final(state).prompt_tokens, engine._final(state).cached_tokens) == (872, 400)


def test_anthropic_forced_json_tool_streams_as_text() -> None:
    events = [
        {"type": "message_start", "message": {"usage": {"input_tokens": 5}}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "tool_use", "id": "t", "name": JSON_TOOL, "input": {}}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": '{"name": '}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "input_json_delta", "partial_json": '"Ada"}'}},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
         "usage": {"output_tokens": 7}}]
    outs, state = read(anthropic_engine(), events)
    assert json.loads("".join(o.text for o in outs)) == {"name": "Ada"}
    assert not calls_of(outs) and state.finish_reason == "stop"


# ------------------------------------------------------------------ Gemini


def test_gemini_request_translates_tools_turns_images_and_json() -> None:
    request = agent_request(
        tool_choice=NamedTool("get_weather"),
        response_format=ResponseFormat("json_schema", SCHEMA),
        sampling=SamplingParams(logprobs=2, presence_penalty=0.25, frequency_penalty=0.5))
    body = build_generate_body(request, 1000)
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    user, model, result = body["contents"]
    assert user == {"role": "user", "parts": [
        {"text": "What is this? Use a tool."},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]}
    assert model == {"role": "model", "parts": [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]}
    assert result == {"role": "user", "parts": [
        {"functionResponse": {"name": "get_weather", "response": {"temp": 21}}}]}
    assert body["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "Weather of a city.",
        "parametersJsonSchema": WEATHER.parameters}]}]
    assert body["toolConfig"] == {"functionCallingConfig": {
        "mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    config = body["generationConfig"]
    assert (config["responseMimeType"], config["responseJsonSchema"]) == (
        "application/json", SCHEMA)
    assert (config["responseLogprobs"], config["logprobs"]) == (True, 2)
    assert (config["presencePenalty"], config["frequencyPenalty"]) == (0.25, 0.5)


def test_gemini_text_tool_result_and_unknown_call_id() -> None:
    messages = conversation()[:3] + [ChatMessage("tool", "sunny", tool_call_id="call_1")]
    body = build_generate_body(GenerationRequest("r", messages=messages), 10)
    assert body["contents"][-1]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"result": "sunny"}}}]
    orphan = [ChatMessage("user", "x"), ChatMessage("tool", "1", tool_call_id="nope")]
    with pytest.raises(InvalidRequest, match="nope"):
        build_generate_body(GenerationRequest("r", messages=orphan), 10)


def gemini_engine() -> GeminiTextEngine:
    return GeminiTextEngine("m", GeminiEngineConfig(type="gemini", model="g"))


def test_gemini_function_calls_get_stable_ids_and_usage() -> None:
    body = fixture("gemini_function_call.json")
    outs, state = read(gemini_engine(), [body])
    assert calls_of(outs) == [
        ToolCall(synth_call_id("req-1", 0), "get_weather", '{"city": "Paris"}'),
        ToolCall(synth_call_id("req-1", 1), "get_time", '{"tz": "CET"}')]
    assert synth_call_id("req-1", 0) == synth_call_id("req-1", 0) != synth_call_id("req-2", 0)
    assert state.finish_reason == "tool_calls"
    assert (state.prompt_tokens, state.completion_tokens) == (120, 30)
    assert (state.cached_tokens, state.reasoning_tokens) == (96, 16)


def test_gemini_logprobs() -> None:
    state = StreamState()
    (out,) = gemini_engine().on_json(fixture("gemini_logprobs.json"), state)
    assert out.logprobs == [
        TokenLogprob("Hi", -1, -0.31, (("Hi", -1, -0.31), ("Hello", -1, -1.4))),
        TokenLogprob(" there", -1, -0.02, ((" there", -1, -0.02),))]


# ------------------------------------------------------------------ what a provider refuses


@pytest.mark.parametrize("provider, request_, field", [
    ("openai", GenerationRequest("r", prompt_token_ids=(1, 2)), "prompt"),
    ("anthropic", GenerationRequest("r", SamplingParams(logprobs=0)), "logprobs"),
    ("anthropic", GenerationRequest("r", SamplingParams(presence_penalty=1.0)),
     "presence_penalty"),
    ("anthropic", GenerationRequest("r", SamplingParams(logit_bias={1: 1.0})), "logit_bias"),
    ("anthropic", GenerationRequest("r", tools=(WEATHER,),
                                    response_format=ResponseFormat("json_object")),
     "response_format"),
    ("anthropic", GenerationRequest("r", response_format=ResponseFormat(
        "json_schema", {"type": "array"})), "response_format"),
    ("gemini", GenerationRequest("r", SamplingParams(logit_bias={1: 1.0})), "logit_bias"),
    ("gemini", GenerationRequest("r", tools=(WEATHER,), parallel_tool_calls=False),
     "parallel_tool_calls"),
])
def test_what_a_provider_cannot_carry_is_named(provider: str, request_: Any, field: str) -> None:
    assert unsupported_field(request_, provider=provider) == field


@pytest.mark.parametrize("provider", ["openai", "azure", "anthropic", "gemini"])
def test_tools_images_and_json_fit_every_provider(provider: str) -> None:
    assert unsupported_field(agent_request(), provider=provider) is None
    json_only = GenerationRequest("r", messages=conversation(),
                                  response_format=ResponseFormat("json_schema", SCHEMA))
    assert unsupported_field(json_only, provider=provider) is None


def test_anthropic_cache_breakpoints_go_back_on_the_turns_last_block() -> None:
    mark = {"type": "ephemeral"}
    messages = [ChatMessage("system", "Long instructions.", cache_control=mark),
                ChatMessage("user", "Read this."), ChatMessage("assistant", "Done."),
                ChatMessage("user", "Now answer.", cache_control=mark)]
    body = build_messages_body("c", GenerationRequest("r", messages=messages), 1)
    assert body["system"] == [{"type": "text", "text": "Long instructions.", "cache_control": mark}]
    assert body["messages"][0] == {"role": "user", "content": "Read this."}
    assert body["messages"][-1] == {"role": "user", "content": [
        {"type": "text", "text": "Now answer.", "cache_control": mark}]}
    plain = build_messages_body("c", GenerationRequest("r", messages=messages[1:3]), 1)
    assert "cache_control" not in json.dumps(plain)


@pytest.mark.parametrize("provider", ["openai", "azure", "anthropic", "gemini", "other"])
def test_echo_with_logprobs_is_named_on_every_provider(provider: str) -> None:
    echoed = GenerationRequest("r", SamplingParams(echo=True, prompt_logprobs=1), prompt="Say hi")
    assert unsupported_field(echoed, provider=provider) == "echo"
    plain_echo = GenerationRequest("r", SamplingParams(echo=True), prompt="Say hi")
    assert unsupported_field(plain_echo, provider=provider) is None

"""Each remote engine against its loopback fake with agent requests: a tool call round
trip, a JSON schema answer, an image turn and cached usage, streamed through the real
transport (the fakes' rules are in tests/fake_agent.py)."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Iterator

import pytest

from deployments.engines.registry import create_text_engine
from deployments.engines.remote import breaker
from serve_app.protocol.internal import (
    ChatMessage,
    GenerationRequest,
    ImagePart,
    ResponseFormat,
    TextPart,
    ToolCall,
    ToolSpec,
    merge_tool_call_deltas,
)
from serve_app.settings import AnthropicEngineConfig, GeminiEngineConfig, OpenAIEngineConfig
from tests.fake_agent import TOOL_CALL_TOKENS
from tests.fake_openai import FakeOpenAI
from tests.fake_providers import FakeAnthropic, FakeGemini

ENV = "TROUPE_TEST_AGENT_KEY"
FAST = {"connect_timeout_s": 2, "first_byte_timeout_s": 2, "idle_timeout_s": 2,
        "total_timeout_s": 8, "retry": {"max_retries": 0}}
WEATHER = ToolSpec("get_weather", "Weather of a city.", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}}
PNG = "data:image/png;base64,iVBORw0KGgo="


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, Any]]:
    with FakeOpenAI() as openai, FakeAnthropic() as anthropic, FakeGemini() as gemini:
        yield {"openai": openai, "azure": openai, "anthropic": anthropic, "gemini": gemini}


def config(provider: str, fake: Any) -> Any:
    common = {"api_key_env": ENV, "credential": f"agent-{provider}", **FAST}
    if provider == "openai":
        return OpenAIEngineConfig(base_url=fake.url, model="gpt-fake", **common)
    if provider == "azure":
        return OpenAIEngineConfig(base_url=fake.url.removesuffix("/v1"), model="gpt-fake",
                                  azure_deployment="dep", **common)
    if provider == "anthropic":
        return AnthropicEngineConfig(base_url=fake.url, model="claude-fake", **common)
    return GeminiEngineConfig(base_url=fake.url, model="gemini-fake", **common)


@pytest.fixture(params=["openai", "azure", "anthropic", "gemini"])
async def engine(request: Any, fakes: dict[str, Any],
                 monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    monkeypatch.setenv(ENV, "k-agent")
    breaker._BREAKERS.clear()
    fake = fakes[request.param]
    fake.reset()
    eng = create_text_engine("m", config(request.param, fake))
    await eng.start()
    eng.fake = fake
    yield eng
    await eng.shutdown()


async def run(engine: Any, request: GenerationRequest) -> tuple[str, list[ToolCall], Any]:
    outs = [o async for o in engine.generate(request)]
    calls = merge_tool_call_deltas([d for o in outs for d in o.tool_calls or ()])
    return "".join(o.text for o in outs), calls, outs[-1]


async def test_tool_call_round_trip(engine: Any) -> None:
    ask = [ChatMessage("user", "What is the weather in Paris? Use the tool.")]
    text, calls, final = await run(engine, GenerationRequest("r1", messages=ask, tools=(WEATHER,)))
    assert text == "" and final.finish_reason == "tool_calls"
    (call,) = calls
    assert (call.name, json.loads(call.arguments)) == ("get_weather", {"city": "Paris"})
    assert call.id
    follow = ask + [ChatMessage("assistant", "", tool_calls=(call,)),
                    ChatMessage("tool", '{"temp": 21}', tool_call_id=call.id)]
    text, calls, final = await run(engine, GenerationRequest("r2", messages=follow,
                                                             tools=(WEATHER,)))
    assert not calls and final.finish_reason == "stop"
    assert text.startswith("Tool said:") and "21" in text


async def test_json_schema_answer(engine: Any) -> None:
    request = GenerationRequest("r", messages=[ChatMessage("user", "Who?")],
                                response_format=ResponseFormat("json_schema", SCHEMA, "person"))
    text, calls, final = await run(engine, request)
    assert json.loads(text) == {"name": "Paris", "age": 1}
    assert not calls and final.finish_reason == "stop"


async def test_image_turn(engine: Any) -> None:
    turn = ChatMessage("user", "What is this?", parts=(TextPart("What is this?"), ImagePart(PNG)))
    text, _, _ = await run(engine, GenerationRequest("r", messages=[turn]))
    assert text == "Saw 1 image(s): image/png"


async def test_cached_tokens_reach_the_final_output(engine: Any) -> None:
    engine.fake.configure(cached_tokens=4)
    outs = [o async for o in engine.generate(GenerationRequest(
        "r", messages=[ChatMessage("user", "Tell me a story please")]))]
    final = outs[-1]
    assert final.cached_tokens == 4
    assert final.prompt_tokens == 8  # the fakes' rule: 5 words + 3 per turn


async def test_tool_call_usage_is_the_providers(engine: Any) -> None:
    ask = [ChatMessage("user", "use a tool")]
    outs = [o async for o in engine.generate(GenerationRequest("r", messages=ask,
                                                               tools=(WEATHER,)))]
    assert sum(o.num_tokens for o in outs) == TOOL_CALL_TOKENS

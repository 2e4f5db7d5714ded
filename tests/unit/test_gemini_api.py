"""Gemini's shape through the official google-genai client against the in-process gateway
(mock engines): text, streams, tool round trips, JSON, images, candidates, logprobs,
countTokens, the models list, tiers and bad input in Google's error envelope."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

import httpx
import jsonschema
import pytest
from google import genai
from google.genai import errors, types
from pydantic import BaseModel

from tests.unit.agent_fakes import PNG, WEATHER, agw  # noqa: F401

MODEL = "mock-fast"
PARAMS = WEATHER["function"]["parameters"]
DECL = types.FunctionDeclaration(name="get_weather", description="Weather by city",
                                 parameters_json_schema=PARAMS)
ASK = "What is the weather in Oslo?"


@pytest.fixture
async def gem(agw) -> AsyncIterator[Any]:  # noqa: F811
    """The official client's async side, as users build it, on the in-process app."""
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=agw.app))
    client = genai.Client(api_key="unused", http_options=types.HttpOptions(
        base_url="http://troupe.test", httpx_async_client=http))
    try:
        yield client.aio
    finally:
        await http.aclose()


def _config(**kwargs: Any) -> types.GenerateContentConfig:
    return types.GenerateContentConfig(**kwargs)


async def test_text_system_instruction_and_usage(gem) -> None:
    cut = await gem.models.generate_content(model=MODEL, contents=ASK,
                                            config=_config(max_output_tokens=5))
    assert cut.candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert len(cut.text.split()) == 5 and cut.usage_metadata.candidates_token_count == 5
    assert cut.model_version == MODEL and cut.response_id
    usage = cut.usage_metadata
    assert usage.total_token_count == usage.prompt_token_count + 5
    sys = await gem.models.generate_content(model=MODEL, contents=ASK, config=_config(
        max_output_tokens=5, system_instruction="Answer in one line.", temperature=0.5, top_p=0.9,
        stop_sequences=["zzz"], seed=3, presence_penalty=0.1, frequency_penalty=0.1,
        safety_settings=[types.SafetySetting(category="HARM_CATEGORY_HATE_SPEECH",
                                             threshold="BLOCK_NONE")]))
    assert sys.usage_metadata.prompt_token_count > usage.prompt_token_count


async def test_stream_matches_unary(gem) -> None:
    cfg = _config(max_output_tokens=12, temperature=0)
    unary = await gem.models.generate_content(model=MODEL, contents=ASK, config=cfg)
    chunks = [c async for c in await gem.models.generate_content_stream(
        model=MODEL, contents=ASK, config=cfg)]
    assert "".join(c.text or "" for c in chunks) == unary.text
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert chunks[-1].usage_metadata.candidates_token_count == 12


async def test_function_call_round_trip_unary_and_streamed(gem) -> None:
    cfg = _config(tools=[types.Tool(function_declarations=[DECL])],
                  tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(
                      mode="ANY", allowed_function_names=["get_weather"])))
    first = await gem.models.generate_content(model=MODEL, contents=ASK, config=cfg)
    (call,) = first.function_calls
    assert call.name == "get_weather" and call.id
    jsonschema.validate(call.args, PARAMS)
    streamed = [c async for c in await gem.models.generate_content_stream(
        model=MODEL, contents=ASK, config=cfg)]
    calls = [fc for c in streamed for fc in c.function_calls or []]
    assert [fc.name for fc in calls] == ["get_weather"]  # whole, in one event
    history = [types.Content(role="user", parts=[types.Part.from_text(text=ASK)]),
               first.candidates[0].content,
               types.Content(role="user", parts=[types.Part.from_function_response(
                   name="get_weather", response={"result": "3 C and windy"})])]
    final = await gem.models.generate_content(model=MODEL, contents=history, config=_config(
        tools=[types.Tool(function_declarations=[DECL])]))
    assert final.text and not final.function_calls
    assert final.candidates[0].finish_reason == types.FinishReason.STOP


async def test_python_function_tool_with_automatic_calling_off(gem) -> None:
    def get_weather(city: str, days: int) -> str:
        """Weather by city."""
        return "3 C"

    out = await gem.models.generate_content(model=MODEL, contents=ASK, config=_config(
        tools=[get_weather], automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
        tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode="ANY"))))
    (call,) = out.function_calls
    assert set(call.args) == {"city", "days"}


class Forecast(BaseModel):
    city: str
    days: int
    rain: bool


async def test_json_with_a_response_schema_is_parsed(gem) -> None:
    out = await gem.models.generate_content(model=MODEL, contents="Oslo?", config=_config(
        response_mime_type="application/json", response_schema=Forecast))
    assert isinstance(out.parsed, Forecast)
    js = await gem.models.generate_content(model=MODEL, contents="Oslo?", config=_config(
        response_mime_type="application/json", response_json_schema=Forecast.model_json_schema()))
    jsonschema.validate(json.loads(js.text), Forecast.model_json_schema())


async def test_images_to_vision_and_text_only_models(gem) -> None:
    image = types.Part.from_bytes(data=__import__("base64").b64decode(PNG.split(",")[1] + "=="),
                                  mime_type="image/png")
    out = await gem.models.generate_content(model="mock-vision", contents=[image, "What is it?"],
                                            config=_config(max_output_tokens=4))
    assert out.text
    with pytest.raises(errors.ClientError) as info:
        await gem.models.generate_content(model=MODEL, contents=[image, "What is it?"])
    assert info.value.code == 400 and info.value.status == "INVALID_ARGUMENT"
    assert "vision" in info.value.message


async def test_candidates_and_logprobs(gem) -> None:
    out = await gem.models.generate_content(model=MODEL, contents=ASK, config=_config(
        candidate_count=2, max_output_tokens=4, response_logprobs=True, logprobs=2))
    assert [c.index for c in out.candidates] == [0, 1]
    assert out.usage_metadata.candidates_token_count == 8
    result = out.candidates[0].logprobs_result
    assert len(result.chosen_candidates) == 4
    assert all(len(t.candidates) == 2 for t in result.top_candidates)
    seen: dict[int, str] = {}
    async for chunk in await gem.models.generate_content_stream(
            model=MODEL, contents=ASK, config=_config(candidate_count=2, max_output_tokens=4)):
        for c in chunk.candidates:
            seen[c.index or 0] = seen.get(c.index or 0, "") + "".join(
                p.text or "" for p in c.content.parts or [])
    assert sorted(seen) == [0, 1] and all(seen.values())


async def test_count_tokens_and_models(gem) -> None:
    short = await gem.models.count_tokens(model=MODEL, contents="hello")
    longer = await gem.models.count_tokens(model=MODEL, contents="hello there, how are you today")
    assert 0 < short.total_tokens < longer.total_tokens
    names = [m.name async for m in await gem.models.list()]
    assert "models/mock-fast" in names and "models/mock-vision" in names
    card = await gem.models.get(model=MODEL)
    assert "generateContent" in card.supported_actions


@pytest.mark.parametrize("config,field", [
    ({"top_k": 3}, "generationConfig.topK"),
    ({"response_mime_type": "text/x.enum"}, "generationConfig.responseMimeType"),
    ({"tools": [types.Tool(google_search=types.GoogleSearch())]}, "tools.0.googleSearch"),
    ({"cached_content": "cachedContents/abc"}, "cachedContent"),
])
async def test_bad_fields_are_400s_naming_them(gem, config: dict, field: str) -> None:
    with pytest.raises(errors.ClientError) as info:
        await gem.models.generate_content(model=MODEL, contents=ASK, config=_config(**config))
    assert info.value.code == 400 and info.value.status == "INVALID_ARGUMENT"
    assert info.value.details["error"]["details"][0]["metadata"]["field"] == field


async def test_unknown_model_is_404_and_a_mid_stream_failure_raises(gem) -> None:
    with pytest.raises(errors.ClientError) as info:
        await gem.models.generate_content(model="gemini-nope", contents=ASK)
    assert info.value.code == 404 and info.value.status == "NOT_FOUND"
    with pytest.raises(errors.ServerError) as failed:
        async for _ in await gem.models.generate_content_stream(model="mock-broken", contents=ASK):
            pass
    assert failed.value.status == "INTERNAL"


async def test_raw_http_paths_tiers_and_stream_errors(agw) -> None:  # noqa: F811
    body = {"contents": [{"parts": [{"text": "hi"}]}], "generationConfig": {"maxOutputTokens": 3}}
    ok = await agw.post(f"/v1beta/models/{MODEL}:generateContent", json=body)
    assert ok.status_code == 200 and ok.json()["candidates"][0]["finishReason"] == "MAX_TOKENS"
    sse = await agw.post(f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse", json=body)
    events = [json.loads(line[6:]) for line in sse.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["usageMetadata"]["candidatesTokenCount"] == 3
    bad = await agw.post(f"/v1beta/models/{MODEL}:generateContent",
                         json={**body, "generationConfig": {"maxOutputTokens": 3, "colour": 1}})
    assert bad.status_code == 400 and "generationConfig.colour" in bad.json()["error"]["message"]
    for field, value in [("start_within", "auto"), ("start_within", "00h-00m-30s")]:
        r = await agw.post(f"/v1beta/models/{MODEL}:generateContent", json={**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["details"][0]["metadata"]["field"] == field
    unknown = await agw.post(f"/v1beta/models/{MODEL}:predict", json=body)
    assert unknown.status_code == 404 and unknown.json()["error"]["status"] == "NOT_FOUND"
    fail = await agw.post("/v1beta/models/mock-broken:streamGenerateContent?alt=sse",
                          json={**body, "generationConfig": {"maxOutputTokens": 30}})
    last = json.loads([line for line in fail.text.splitlines() if line.startswith("data: ")][-1][6:])
    assert last["error"]["status"] == "INTERNAL" and last["error"]["code"] == 500
    openai_list = await agw.get("/v1/models")
    assert openai_list.json()["object"] == "list"  # no Google header: still OpenAI's shape
    google_list = await agw.get("/v1/models", headers={"x-goog-api-key": "k"})
    assert "models" in google_list.json()
    openai_card = await agw.get("/v1/models/org/mock")  # ids with '/' or ':' stay OpenAI's
    assert openai_card.json()["id"] == "org/mock"
    gemini_card = await agw.get("/v1beta/models/org/mock")
    assert gemini_card.json()["name"] == "models/org/mock"
    via_v1 = await agw.post("/v1/models/org/mock:generateContent", json=body)
    assert via_v1.json()["modelVersion"] == "org/mock"

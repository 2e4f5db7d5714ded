"""Gemini's shape through the real Serve app with the official google-genai client, as users
build it (``api_key`` + ``HttpOptions(base_url=...)``): the bundled SmolLM2 for forced
function calls and JSON (local constrained decoding), mock models for text, streams,
images and embeddings, and auth on (a Troupe key as the Gemini API key).

Its own app (route prefix /gem, its own key store), deleted at module end.
"""

from __future__ import annotations

import asyncio
import base64
from typing import Any, Iterator

import httpx
import jsonschema
import pytest
from google import genai
from google.genai import errors, types
from pydantic import BaseModel, Field

from serve_app.policies.keys import mint_key
from serve_app.store.sqlite import SQLiteStore

pytestmark = pytest.mark.models

PREFIX = "/gem"
LOCAL = "smollm2-135m"
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
MODELS = [
    {"id": LOCAL, "engine": {"type": "transformers", "num_threads": 1}, "default_max_tokens": 64,
     "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}},
    {"id": "mock-text", "engine": {"type": "mock", "token_delay_ms": 5, "min_output_tokens": 20,
                                   "max_output_tokens": 30},
     "deployment": {"ray_actor_options": {"num_cpus": 0.05}}},
    {"id": "mock-vision", "engine": {"type": "mock", "token_delay_ms": 0}, "vision": True,
     "deployment": {"ray_actor_options": {"num_cpus": 0.05}}},
    {"id": "mock-embed", "modality": "embeddings", "engine": {"type": "mock", "dimensions": 64},
     "deployment": {"ray_actor_options": {"num_cpus": 0.05}}},
]


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    path = tmp_path_factory.mktemp("gemini") / "state.db"
    made = {"path": str(path)}

    async def create() -> None:
        store = SQLiteStore(path)
        await store.open()
        for name, role, extra in [("user", "workspace", {}),
                                  ("scoped", "models", {"models": ("mock-text",)})]:
            token, row = mint_key(name, role, **extra)
            await store.key_create(row)
            made[name] = token
        await store.close()

    asyncio.run(create())
    return made


@pytest.fixture(scope="module")
def base(serve_instance: int, keys: dict[str, str]) -> Iterator[str]:
    from ray import serve

    from serve_app.build.app import build_app

    args = {"models": MODELS, "gateway": {"ray_actor_options": {"num_cpus": 0.1}},
            "metrics": {"store_url": "sqlite:///" + keys["path"].lstrip("/"),
                        "flush_interval_s": 0.2, "serve_poll_interval_s": 0}}
    serve.run(build_app(args), name="gemini", route_prefix=PREFIX)
    url = f"http://127.0.0.1:{serve_instance}{PREFIX}"
    assert httpx.get(url + "/health", timeout=120).status_code == 200
    yield url
    serve.delete("gemini")


@pytest.fixture(scope="module")
def gem(base: str, keys: dict[str, str]) -> genai.Client:
    return genai.Client(api_key=keys["user"], http_options=types.HttpOptions(base_url=base))


def test_text_system_instruction_and_stream(gem: genai.Client) -> None:
    plain = gem.models.generate_content(model="mock-text", contents="Hello")
    told = gem.models.generate_content(model="mock-text", contents="Hello", config=types.GenerateContentConfig(
        system_instruction="Answer in one short line."))
    assert told.usage_metadata.prompt_token_count > plain.usage_metadata.prompt_token_count
    assert plain.candidates[0].finish_reason == types.FinishReason.STOP
    greedy = types.GenerateContentConfig(temperature=0, max_output_tokens=12)
    unary = gem.models.generate_content(model="mock-text", contents="Hello", config=greedy)
    chunks = list(gem.models.generate_content_stream(model="mock-text", contents="Hello", config=greedy))
    assert len(chunks) >= 2 and "".join(c.text or "" for c in chunks) == unary.text
    assert chunks[-1].candidates[0].finish_reason == types.FinishReason.MAX_TOKENS
    assert chunks[-1].usage_metadata.total_token_count == unary.usage_metadata.total_token_count


def test_forced_function_call_round_trip_on_smollm2(gem: genai.Client) -> None:
    tool = types.Tool(function_declarations=[types.FunctionDeclaration(
        name="get_weather", description="The weather in a city now", parameters_json_schema=WEATHER)])
    ask = types.Content(role="user", parts=[types.Part.from_text(text="Weather in Paris?")])
    first = gem.models.generate_content(model=LOCAL, contents=[ask], config=types.GenerateContentConfig(
        tools=[tool], temperature=0, max_output_tokens=80,
        tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode="ANY"))))
    (call,) = first.function_calls
    assert call.name == "get_weather"
    jsonschema.validate(call.args, WEATHER)
    history = [ask, first.candidates[0].content, types.Content(role="user", parts=[
        types.Part.from_function_response(name="get_weather", response={"result": "18 C, sunny"})])]
    final = gem.models.generate_content(model=LOCAL, contents=history, config=types.GenerateContentConfig(
        tools=[tool], temperature=0, max_output_tokens=24,
        tool_config=types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode="NONE"))))
    assert final.text and final.text.strip()


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


def test_json_with_response_schema_is_parsed_on_smollm2(gem: genai.Client) -> None:
    out = gem.models.generate_content(model=LOCAL, contents="Describe a baker.", config=types.GenerateContentConfig(
        response_mime_type="application/json", response_schema=Person, temperature=0, max_output_tokens=48))
    assert isinstance(out.parsed, Person), out.text


def test_images_count_tokens_embeddings_and_models(gem: genai.Client) -> None:
    image = types.Part.from_bytes(data=base64.b64decode(PNG), mime_type="image/png")
    assert gem.models.generate_content(model="mock-vision", contents=[image, "What is it?"]).text
    with pytest.raises(errors.ClientError) as info:
        gem.models.generate_content(model=LOCAL, contents=[image, "What is it?"])
    assert info.value.code == 400 and info.value.status == "INVALID_ARGUMENT"
    short = gem.models.count_tokens(model=LOCAL, contents="Hi")
    longer = gem.models.count_tokens(model=LOCAL, contents="Hi there, how is the weather in Paris?")
    assert 0 < short.total_tokens < longer.total_tokens
    one = gem.models.embed_content(model="mock-embed", contents="hello")
    two = gem.models.embed_content(model="mock-embed", contents=["hello", "world"])
    assert len(one.embeddings) == 1 and len(one.embeddings[0].values) == 64
    assert len(two.embeddings) == 2 and two.embeddings[0].values == one.embeddings[0].values
    names = {m.name for m in gem.models.list()}
    assert {f"models/{m['id']}" for m in MODELS} <= names
    assert "embedContent" in gem.models.get(model="mock-embed").supported_actions


def test_bad_input_and_auth(gem: genai.Client, base: str, keys: dict[str, str]) -> None:
    with pytest.raises(errors.ClientError) as info:
        gem.models.generate_content(model="gemini-nope", contents="x")
    assert (info.value.code, info.value.status) == (404, "NOT_FOUND")
    with pytest.raises(errors.ClientError) as info:
        gem.models.generate_content(model="mock-text", contents="x",
                                    config=types.GenerateContentConfig(top_k=4))
    assert info.value.code == 400 and "generationConfig.topK" in info.value.message
    scoped = genai.Client(api_key=keys["scoped"], http_options=types.HttpOptions(base_url=base))
    assert scoped.models.generate_content(model="mock-text", contents="x").text
    with pytest.raises(errors.ClientError) as info:
        scoped.models.generate_content(model=LOCAL, contents="x")
    assert (info.value.code, info.value.status) == (403, "PERMISSION_DENIED")
    body: dict[str, Any] = {"contents": [{"parts": [{"text": "hi"}]}],
                            "generationConfig": {"maxOutputTokens": 3}}
    with httpx.Client(base_url=base, timeout=60) as http:
        anonymous = http.post("/v1beta/models/mock-text:generateContent", json=body)
        assert anonymous.status_code == 401 and anonymous.json()["error"]["status"] == "UNAUTHENTICATED"
        by_query = http.post(f"/v1beta/models/mock-text:generateContent?key={keys['user']}", json=body)
        assert by_query.status_code == 200 and by_query.json()["usageMetadata"]["candidatesTokenCount"] == 3
        refused = http.post("/v1beta/models/mock-text:generateContent?key=trp_bad_key", json=body)
        assert refused.status_code == 401 and refused.json()["error"]["status"] == "UNAUTHENTICATED"


def test_interactions_unary_and_streamed(gem: genai.Client) -> None:
    done = gem.interactions.create(model="mock-text", input="Hello",
                                   generation_config={"max_output_tokens": 6, "temperature": 0})
    assert done.status == "incomplete" and done.usage.total_output_tokens == 6
    events = list(gem.interactions.create(model="mock-text", input="Hello", stream=True,
                                          generation_config={"max_output_tokens": 6, "temperature": 0}))
    assert "".join(e.delta.text for e in events if e.event_type == "step.delta") == done.output_text
    assert events[-1].event_type == "interaction.completed"

"""Agents through real Serve on the bundled SmolLM2 with the official openai client (issue
15's bar): ``chat.completions.parse`` and ``responses.parse`` with pydantic models, and
``tool_choice`` required and named, 20 of 20; a streamed forced call reassembles to the
unary call; the tool result fed back gets a text answer."""

from __future__ import annotations

import json
from typing import Literal, Iterator

import httpx
import jsonschema
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

pytestmark = pytest.mark.models

MODEL = "smollm2-135m"
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -9999, "maximum": 9999},
                                        "b": {"type": "integer", "minimum": -9999, "maximum": 9999}},
       "required": ["a", "b"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}}]


class Person(BaseModel):
    name: str = Field(max_length=20)
    age: int = Field(ge=0, le=120)
    mood: Literal["happy", "sad", "calm"]


class Verdict(BaseModel):
    positive: bool
    reason: str = Field(max_length=30)


PEOPLE = ["a baker from Rome", "a young pilot", "an old sailor", "a shy student", "a famous singer",
          "a tired doctor", "a chess player", "a kind neighbour", "a busy farmer", "a cheerful clown"]


@pytest.fixture(scope="module")
def client(serve_instance: int) -> Iterator[OpenAI]:
    from ray import serve

    from serve_app.build.app import build_app

    args = {"models": [{"id": MODEL, "modality": "text", "engine": {"type": "transformers", "num_threads": 1},
                        "default_max_tokens": 128,
                        "deployment": {"num_replicas": 1, "ray_actor_options": {"num_cpus": 0.5}}}]}
    serve.run(build_app(args), name="agents", route_prefix="/agents")
    url = f"http://127.0.0.1:{serve_instance}/agents"
    assert httpx.get(url + "/health", timeout=120).json()["status"] == "ok"
    yield OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    serve.delete("agents")  # its replica's CPU goes back to the next module's app


def test_chat_parse_with_a_pydantic_model_20_of_20(client: OpenAI) -> None:
    for i in range(20):
        who = PEOPLE[i % len(PEOPLE)]
        done = client.chat.completions.parse(
            model=MODEL, messages=[{"role": "user", "content": f"Describe {who}."}],
            response_format=Person, max_tokens=160, temperature=0 if i < 10 else 0.8, seed=i,
        )
        assert isinstance(done.choices[0].message.parsed, Person), done.choices[0].message.content


REVIEWS = ["I loved it", "Terrible service", "Great value", "Never again", "Fine",
           "The soup was cold", "Best trip ever", "Too loud at night", "Friendly staff", "Meh"]


def test_responses_parse_with_a_text_format_20_of_20(client: OpenAI) -> None:
    for i in range(20):
        text = REVIEWS[i % len(REVIEWS)]
        done = client.responses.parse(model=MODEL, input=f"Review: {text}. Is it positive?",
                                      text_format=Verdict, max_output_tokens=120,
                                      temperature=0 if i < 10 else 0.8)
        assert isinstance(done.output_parsed, Verdict), done.output_text


def test_required_and_named_tool_calls_20_of_20(client: OpenAI) -> None:
    asks = ["Weather in Paris?", "What is 2 plus 3?", "Is it cold in Oslo?", "Add 10 and 32.",
            "Temperature in Lima, in fahrenheit."]
    for i in range(20):
        ask = asks[i % len(asks)]
        named = "add" if "dd" in ask or "plus" in ask else "get_weather"
        choice = "required" if i < 10 else {"type": "function", "function": {"name": named}}
        done = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": ask}], tools=TOOLS, tool_choice=choice,
            max_tokens=120, temperature=0 if i % 2 else 0.7, seed=i)
        [call] = done.choices[0].message.tool_calls
        assert done.choices[0].finish_reason == "tool_calls"
        schema = WEATHER if call.function.name == "get_weather" else ADD
        if i >= 10:
            assert call.function.name == named
        jsonschema.validate(json.loads(call.function.arguments), schema)


def test_streamed_call_reassembles_and_the_result_gets_an_answer(client: OpenAI) -> None:
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
                  tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=60,
                  temperature=0)
    unary = client.chat.completions.create(**kwargs).choices[0].message.tool_calls[0]
    fragments = [tc for chunk in client.chat.completions.create(stream=True, **kwargs)
                 for c in chunk.choices for tc in c.delta.tool_calls or []]
    assert fragments[0].function.name == "get_weather" and len(fragments) > 2
    assert "".join(f.function.arguments or "" for f in fragments) == unary.function.arguments
    history = [kwargs["messages"][0],
               {"role": "assistant", "tool_calls": [{"id": unary.id, "type": "function", "function": {
                   "name": "get_weather", "arguments": unary.function.arguments}}]},
               {"role": "tool", "tool_call_id": unary.id, "content": "18 C and sunny"}]
    final = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=40, temperature=0)
    assert final.choices[0].message.content and final.choices[0].finish_reason in ("stop", "length")


def test_openai_agents_sdk_two_step_loop(client: OpenAI) -> None:
    """A function tool, its result fed back, a final answer (the SDK drives the loop)."""
    agents = pytest.importorskip("agents")
    from openai import AsyncOpenAI

    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"It is 18 C and sunny in {city}."

    model = agents.OpenAIChatCompletionsModel(
        model=MODEL, openai_client=AsyncOpenAI(base_url=str(client.base_url), api_key="unused", max_retries=0))
    # required on the first turn; the SDK resets tool_choice after a call, so turn two answers
    agent = agents.Agent(name="weather", instructions="Answer weather questions with the tool.", tools=[get_weather],
                         model=model, model_settings=agents.ModelSettings(tool_choice="required", max_tokens=60,
                                                                          temperature=0))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert len(seen) == 1 and seen[0]
    assert isinstance(result.final_output, str) and result.final_output.strip()

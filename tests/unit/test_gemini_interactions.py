"""Gemini's Interactions API shape (text turns) through the official google-genai client
against the in-process gateway's mock models, and its refusals."""

from __future__ import annotations

from typing import Any, AsyncIterator

import httpx
import pytest
from google import genai
from google.genai import types

from tests.unit.agent_fakes import PNG, agw  # noqa: F401

MODEL = "mock-fast"


@pytest.fixture
async def gem(agw) -> AsyncIterator[Any]:  # noqa: F811
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=agw.app))
    client = genai.Client(api_key="unused", http_options=types.HttpOptions(
        base_url="http://troupe.test", httpx_async_client=http))
    try:
        yield client.aio
    finally:
        await http.aclose()


async def test_create_unary_and_stream(gem) -> None:
    cut = await gem.interactions.create(model=MODEL, input="Hello", system_instruction="Be brief.",
                                        generation_config={"max_output_tokens": 5, "temperature": 0})
    assert cut.status == "incomplete" and len(cut.output_text.split()) == 5
    assert cut.usage.total_output_tokens == 5
    assert cut.usage.total_tokens == cut.usage.total_input_tokens + 5
    events = [e async for e in await gem.interactions.create(
        model=MODEL, input=[{"type": "text", "text": "Hello"}], stream=True,
        system_instruction="Be brief.", generation_config={"max_output_tokens": 5, "temperature": 0})]
    kinds = [e.event_type for e in events]
    assert kinds[:2] == ["interaction.created", "step.start"]
    assert kinds[-2:] == ["step.stop", "interaction.completed"]
    text = "".join(e.delta.text for e in events if e.event_type == "step.delta")
    assert text == cut.output_text and events[-1].interaction.usage.total_output_tokens == 5
    done = await gem.interactions.create(model=MODEL, input="Hello")
    assert done.status == "completed"


async def test_history_steps_images_and_refusals(agw, gem) -> None:  # noqa: F811
    image = {"type": "image", "mime_type": "image/png", "data": PNG.split(",")[1]}
    steps = [{"type": "user_input", "content": [{"type": "text", "text": "Hi"}]},
             {"type": "model_output", "content": [{"type": "text", "text": "Hello!"}]},
             {"type": "user_input", "content": [image, {"type": "text", "text": "What is it?"}]}]
    out = await agw.post("/v1beta/interactions", json={"model": "mock-vision", "input": steps,
                                                       "generation_config": {"max_output_tokens": 3}})
    assert out.status_code == 200 and out.json()["steps"][0]["content"][0]["text"]
    for body, field in [
        ({"input": steps}, "input"),  # mock-fast reads no images
        ({"input": "x", "tools": [{"type": "function", "name": "f"}]}, "tools"),
        ({"input": "x", "previous_interaction_id": "abc"}, "previous_interaction_id"),
        ({"input": "x", "generation_config": {"top_k": 3}}, "generation_config.top_k"),
        ({"input": 7}, "input"),
    ]:
        r = await agw.post("/v1/interactions", json={"model": MODEL, **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["status"] == "INVALID_ARGUMENT"
        assert r.json()["error"]["details"][0]["metadata"]["field"] == field
    missing = await agw.post("/v1beta/interactions", json={"model": "nope", "input": "x"})
    assert missing.status_code == 404 and missing.json()["error"]["status"] == "NOT_FOUND"

"""Bad agent input (issue 15, Build 2-5): every field is a 400 naming it, never a 5xx."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.agent_fakes import PNG, WEATHER, agw  # noqa: F401
from tests.unit.gateway_fakes import assert_openai_error

ASK = [{"role": "user", "content": "hi"}]


def _chat(**extra: Any) -> dict[str, Any]:
    return {"model": "mock-fast", "messages": ASK, **extra}


def _tool(**function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": "f", **function}}


def _image(url: str, model: str = "mock-vision") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]}


BAD_CHAT: list[tuple[str, dict[str, Any], str]] = [
    ("tools not a list", _chat(tools={"a": 1}), "tools"),
    ("tool of another type", _chat(tools=[{"type": "retrieval"}]), "tools.0.type"),
    ("tool without function", _chat(tools=[{"type": "function"}]), "tools.0.function"),
    ("function name with spaces", _chat(tools=[_tool(name="get weather")]),
     "tools.0.function.name"),
    ("parameters not a schema", _chat(tools=[_tool(parameters={"type": 5})]),
     "tools.0.function.parameters"),
    ("parameters not an object schema", _chat(tools=[_tool(parameters={"type": "string"})]),
     "tools.0.function.parameters"),
    ("duplicate tool names", _chat(tools=[_tool(), _tool()]), "tools"),
    ("tool_choice unknown word", _chat(tools=[WEATHER], tool_choice="always"), "tool_choice"),
    ("tool_choice names a missing tool",
     _chat(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}}),
     "tool_choice"),
    ("tool_choice required without tools", _chat(tool_choice="required"), "tool_choice"),
    ("parallel_tool_calls a string", _chat(parallel_tool_calls="maybe"), "parallel_tool_calls"),
    ("tool message without tool_call_id",
     _chat(messages=[*ASK, {"role": "tool", "content": "3"}]), "messages.1"),
    ("tool_calls on a user message", _chat(messages=[{"role": "user", "content": "x", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]),
     "messages.0"),
    ("tool call without arguments", _chat(messages=[*ASK, {"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f"}}]}]),
     "messages.1.tool_calls.0.function.arguments"),
    ("response_format unknown type", _chat(response_format={"type": "yaml"}),
     "response_format.type"),
    ("json_schema without its object", _chat(response_format={"type": "json_schema"}),
     "response_format"),
    ("json_schema invalid schema", _chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objekt"}}}), "response_format.json_schema.schema"),
    ("top_logprobs 21", _chat(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("top_logprobs 21 streamed", _chat(logprobs=True, top_logprobs=21, stream=True),
     "top_logprobs"),
    ("top_logprobs without logprobs", _chat(top_logprobs=2), "top_logprobs"),
    ("logprobs a string", _chat(logprobs="some"), "logprobs"),
    ("presence_penalty 3", _chat(presence_penalty=3), "presence_penalty"),
    ("frequency_penalty -2.5", _chat(frequency_penalty=-2.5), "frequency_penalty"),
    ("logit_bias key not an id", _chat(logit_bias={"hello": 1}), "logit_bias"),
    ("logit_bias value 200", _chat(logit_bias={"5": 200}), "logit_bias"),
    ("logit_bias id outside the vocabulary", _chat(logit_bias={"99999999": 1}), "logit_bias"),
    ("n 0", _chat(n=0), "n"),
    ("n 129", _chat(n=129), "n"),
    ("content part of type input_audio",
     _chat(messages=[{"role": "user", "content": [{"type": "input_audio"}]}]),
     "messages.0.content"),
    ("image part without image_url",
     _chat(messages=[{"role": "user", "content": [{"type": "image_url"}]}]), "messages.0.content"),
    ("image in a system message", _chat(messages=[{"role": "system", "content": [
        {"type": "image_url", "image_url": {"url": PNG}}]}]), "messages.0"),
    ("image detail unknown", {"model": "mock-vision", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PNG, "detail": "max"}}]}]},
     "messages.0.content"),
    ("image for a text-only model", _image(PNG, "mock-fast"), "messages"),
    ("image data URL not base64", _image("data:image/png;base64,%%%"), "image_url"),
    ("image data URL not an image", _image("data:text/plain;base64,aGk="), "image_url"),
    ("image URL host not allowed", _image("https://example.com/cat.png"), "image_url"),
    ("image URL of another scheme", _image("ftp://example.com/cat.png"), "image_url"),
    ("legacy functions", _chat(functions=[{"name": "f"}]), "functions"),
    ("audio output", _chat(audio={"voice": "alloy", "format": "mp3"}), "audio"),
    ("modalities with audio", _chat(modalities=["text", "audio"]), "modalities"),
    ("prediction", _chat(prediction={"type": "content", "content": "x"}), "prediction"),
]


@pytest.mark.parametrize("case,body,param", BAD_CHAT, ids=[c[0] for c in BAD_CHAT])
async def test_bad_chat_agent_input_is_400_naming_the_field(agw, case, body, param) -> None:
    response = await agw.post("/v1/chat/completions", json=body)
    err = assert_openai_error(response, 400, "invalid_request")
    assert err["param"] == param, err["message"]


BAD_COMPLETIONS: list[tuple[str, dict[str, Any], str]] = [
    ("prompt empty list", {"prompt": []}, "prompt"),
    ("prompt mixed list", {"prompt": ["a", 1]}, "prompt"),
    ("prompt negative token id", {"prompt": [1, -2]}, "prompt"),
    ("prompt token id outside the vocabulary", {"prompt": [1, 10**12]}, "prompt"),
    ("prompt an empty token list", {"prompt": [[1], []]}, "prompt"),
    ("logprobs 21", {"prompt": "x", "logprobs": 21}, "logprobs"),
    ("logprobs a bool list", {"prompt": "x", "logprobs": [1]}, "logprobs"),
    ("echo a string", {"prompt": "x", "echo": "maybe"}, "echo"),
    ("suffix", {"prompt": "x", "suffix": "end"}, "suffix"),
    ("best_of above n", {"prompt": "x", "best_of": 3}, "best_of"),
    ("presence_penalty -3", {"prompt": "x", "presence_penalty": -3}, "presence_penalty"),
    ("logit_bias value -101", {"prompt": "x", "logit_bias": {"1": -101}}, "logit_bias"),
]


@pytest.mark.parametrize("case,body,param", BAD_COMPLETIONS, ids=[c[0] for c in BAD_COMPLETIONS])
async def test_bad_completions_input_is_400_naming_the_field(agw, case, body, param) -> None:
    response = await agw.post("/v1/completions", json={"model": "mock-fast", **body})
    err = assert_openai_error(response, 400, "invalid_request")
    assert err["param"] == param, err["message"]

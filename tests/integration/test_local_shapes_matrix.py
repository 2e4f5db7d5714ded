"""The caller-shape matrix against the bundled local model (issue 16): chat completions and
Responses (``openai``), Messages (``anthropic``) and Gemini (``google-genai``) × {text, tool
round trip, json_schema, image} × {stream, unary}, each through the official client.

Tools and JSON run on the bundled SmolLM2 with the local constrained decoding (the forced
call's arguments and the JSON are valid against their schemas by construction). SmolLM2
reads no images: its image cell is the documented 400 naming the turns' field; the image
itself is served by a vision-capable mock model in the same app.

Each shape is one adapter entry (see :mod:`tests.gemini_shape` for the interface), so the
remote-provider matrix can take the same entries. Its own app (route prefix /shapes),
deleted at module end.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

import httpx
import jsonschema
import pytest

from tests.gemini_shape import ASK_TOOL, PARAMS, PNG_B64, RESULT, SCHEMA, GeminiShape, ShapeError

pytestmark = pytest.mark.models

LOCAL = "smollm2-135m"
VISION = "mock-vision"
PREFIX = "/shapes"
#: Bounded, so the constrained outputs of a 135M model stay short.
TOOL = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}


def _openai_error(exc: Any) -> ShapeError:
    body = exc.body if isinstance(exc.body, dict) else {}
    return ShapeError(exc.status_code, body.get("param"), str(exc))


class ChatShape:
    """``chat.completions`` through the ``openai`` client."""

    name = "chat"

    def __init__(self, base: str, http_client: Any = None) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120,
                             http_client=http_client)

    def _create(self, stream: bool, **kwargs: Any) -> tuple[str, list[dict[str, str]]]:
        import openai

        try:
            if not stream:
                msg = self.client.chat.completions.create(**kwargs).choices[0].message
                return msg.content or "", [{"id": c.id, "name": c.function.name,
                                            "arguments": c.function.arguments}
                                           for c in msg.tool_calls or []]
            text: list[str] = []
            calls: dict[int, dict[str, str]] = {}
            for chunk in self.client.chat.completions.create(stream=True, **kwargs):
                for choice in chunk.choices:
                    text.append(choice.delta.content or "")
                    for tc in choice.delta.tool_calls or []:
                        slot = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                        slot["id"] = tc.id or slot["id"]
                        if tc.function is not None:
                            slot["name"] = tc.function.name or slot["name"]
                            slot["arguments"] += tc.function.arguments or ""
            return "".join(text), [calls[i] for i in sorted(calls)]
        except openai.APIStatusError as exc:
            raise _openai_error(exc) from None

    def text(self, model: str, stream: bool, prompt: str = "Say hi",
             max_tokens: Optional[int] = None) -> str:
        return self._create(stream, model=model, messages=[{"role": "user", "content": prompt}],
                            max_tokens=max_tokens)[0]

    def tool_round_trip(self, model: str, stream: bool, prompt: str = ASK_TOOL,
                        params: Optional[dict] = None, result: str = RESULT,
                        forced: bool = False) -> tuple[dict[str, str], str]:
        tools = [{"type": "function", "function": {"name": "get_weather", "parameters": params or PARAMS}}]
        ask = [{"role": "user", "content": prompt}]
        _, (call,) = self._create(stream, model=model, messages=ask, tools=tools, max_tokens=96,
                                  tool_choice="required" if forced else "auto")
        history = [*ask, {"role": "assistant", "tool_calls": [{"id": call["id"], "type": "function", "function": {
            "name": call["name"], "arguments": call["arguments"]}}]},
            {"role": "tool", "tool_call_id": call["id"], "content": result}]
        final, _ = self._create(stream, model=model, messages=history, tools=tools, max_tokens=24,
                                tool_choice="none" if forced else "auto")
        return call, final

    def json(self, model: str, stream: bool, schema: Optional[dict] = None, prompt: str = "Who?",
             max_tokens: Optional[int] = None) -> Any:
        fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema or SCHEMA,
                                                      "strict": True}}
        return json.loads(self._create(stream, model=model, response_format=fmt, max_tokens=max_tokens,
                                       messages=[{"role": "user", "content": prompt}])[0])

    def image(self, model: str, stream: bool, prompt: str = "What is this?",
              max_tokens: Optional[int] = None) -> str:
        content = [{"type": "text", "text": prompt},
                   {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG_B64}}]
        return self._create(stream, model=model, messages=[{"role": "user", "content": content}],
                            max_tokens=max_tokens)[0]


class ResponsesShape:
    """``responses`` through the ``openai`` client."""

    name = "responses"

    def __init__(self, base: str, http_client: Any = None) -> None:
        from openai import OpenAI

        self.client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120,
                             http_client=http_client)

    def _create(self, stream: bool, **kwargs: Any) -> Any:
        import openai

        try:
            if not stream:
                return self.client.responses.create(**kwargs)
            events = list(self.client.responses.create(stream=True, **kwargs))
            out = events[-1].response
            assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == out.output_text
            return out
        except openai.APIStatusError as exc:
            raise _openai_error(exc) from None

    def text(self, model: str, stream: bool, prompt: str = "Say hi",
             max_tokens: Optional[int] = None) -> str:
        return self._create(stream, model=model, input=prompt, max_output_tokens=max_tokens).output_text

    def tool_round_trip(self, model: str, stream: bool, prompt: str = ASK_TOOL,
                        params: Optional[dict] = None, result: str = RESULT,
                        forced: bool = False) -> tuple[dict[str, str], str]:
        tools = [{"type": "function", "name": "get_weather", "parameters": params or PARAMS}]
        first = self._create(stream, model=model, input=prompt, tools=tools, max_output_tokens=96,
                             tool_choice="required" if forced else "auto")
        (item,) = [o for o in first.output if o.type == "function_call"]
        history = [{"role": "user", "content": prompt},
                   {"type": "function_call", "call_id": item.call_id, "name": item.name,
                    "arguments": item.arguments},
                   {"type": "function_call_output", "call_id": item.call_id, "output": result}]
        final = self._create(stream, model=model, input=history, tools=tools, max_output_tokens=24,
                             tool_choice="none" if forced else "auto")
        return {"id": item.call_id, "name": item.name, "arguments": item.arguments}, final.output_text

    def json(self, model: str, stream: bool, schema: Optional[dict] = None, prompt: str = "Who?",
             max_tokens: Optional[int] = None) -> Any:
        fmt = {"format": {"type": "json_schema", "name": "out", "schema": schema or SCHEMA, "strict": True}}
        return json.loads(self._create(stream, model=model, input=prompt, text=fmt,
                                       max_output_tokens=max_tokens).output_text)

    def image(self, model: str, stream: bool, prompt: str = "What is this?",
              max_tokens: Optional[int] = None) -> str:
        turn = {"role": "user", "content": [{"type": "input_text", "text": prompt}, {
            "type": "input_image", "image_url": "data:image/png;base64," + PNG_B64}]}
        return self._create(stream, model=model, input=[turn], max_output_tokens=max_tokens).output_text


class MessagesShape:
    """``messages`` through the ``anthropic`` client."""

    name = "messages"

    def __init__(self, base: str, http_client: Any = None) -> None:
        from anthropic import Anthropic

        self.client = Anthropic(base_url=base, api_key="unused", max_retries=0, timeout=120,
                                http_client=http_client)

    def _create(self, stream: bool, **kwargs: Any) -> Any:
        import anthropic

        try:
            if not stream:
                return self.client.messages.create(**kwargs)
            with self.client.messages.stream(**kwargs) as events:
                text = "".join(events.text_stream)
                final = events.get_final_message()
            assert text == self._text(final)
            return final
        except anthropic.APIStatusError as exc:
            raise ShapeError(exc.status_code, None, str(exc)) from None

    @staticmethod
    def _text(message: Any) -> str:
        return "".join(b.text for b in message.content if b.type == "text")

    def text(self, model: str, stream: bool, prompt: str = "Say hi", max_tokens: int = 64) -> str:
        return self._text(self._create(stream, model=model, max_tokens=max_tokens,
                                       messages=[{"role": "user", "content": prompt}]))

    def tool_round_trip(self, model: str, stream: bool, prompt: str = ASK_TOOL,
                        params: Optional[dict] = None, result: str = RESULT,
                        forced: bool = False) -> tuple[dict[str, str], str]:
        tools = [{"name": "get_weather", "input_schema": params or PARAMS}]
        ask = [{"role": "user", "content": prompt}]
        first = self._create(stream, model=model, max_tokens=96, messages=ask, tools=tools,
                             tool_choice={"type": "any" if forced else "auto"})
        (use,) = [b for b in first.content if b.type == "tool_use"]
        history = [*ask, {"role": "assistant", "content": [
            {"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": result}]}]
        final = self._create(stream, model=model, max_tokens=24, messages=history, tools=tools,
                             tool_choice={"type": "none" if forced else "auto"})
        return {"id": use.id, "name": use.name, "arguments": json.dumps(use.input)}, self._text(final)

    def json(self, model: str, stream: bool, schema: Optional[dict] = None, prompt: str = "Who?",
             max_tokens: int = 64) -> Any:
        return json.loads(self._text(self._create(
            stream, model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": prompt}],
            output_config={"format": {"type": "json_schema", "schema": schema or SCHEMA}})))

    def image(self, model: str, stream: bool, prompt: str = "What is this?", max_tokens: int = 64) -> str:
        content = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG_B64}},
                   {"type": "text", "text": prompt}]
        return self._text(self._create(stream, model=model, max_tokens=max_tokens,
                                       messages=[{"role": "user", "content": content}]))


SHAPES = [ChatShape, ResponsesShape, MessagesShape, GeminiShape]


@pytest.fixture(scope="module")
def base(serve_instance: int) -> Iterator[str]:
    from ray import serve

    from serve_app.build.app import build_app

    args = {"models": [
        {"id": LOCAL, "engine": {"type": "transformers", "num_threads": 1}, "default_max_tokens": 64,
         "deployment": {"num_replicas": 1, "max_ongoing_requests": 8,
                        "ray_actor_options": {"num_cpus": 0.5}}},
        {"id": VISION, "engine": {"type": "mock", "token_delay_ms": 0}, "vision": True,
         "deployment": {"ray_actor_options": {"num_cpus": 0.05}}},
    ], "gateway": {"ray_actor_options": {"num_cpus": 0.1}}}
    serve.run(build_app(args), name="shapes", route_prefix=PREFIX)
    url = f"http://127.0.0.1:{serve_instance}{PREFIX}"
    assert httpx.get(url + "/health", timeout=120).json()["status"] == "ok"
    yield url
    serve.delete("shapes")


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: s.name)
def shape(request: Any, base: str) -> Any:
    return request.param(base)


STREAM = pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])


@STREAM
def test_text(shape: Any, stream: bool) -> None:
    assert shape.text(LOCAL, stream, "Say hello to Ada.", max_tokens=8).strip()


@STREAM
def test_tool_round_trip(shape: Any, stream: bool) -> None:
    call, final = shape.tool_round_trip(LOCAL, stream, "What is the weather in Paris?", TOOL,
                                        "18 C and sunny", forced=True)
    assert call["name"] == "get_weather" and call["id"]
    jsonschema.validate(json.loads(call["arguments"]), TOOL)
    assert final.strip()


@STREAM
def test_json_schema(shape: Any, stream: bool) -> None:
    out = shape.json(LOCAL, stream, PERSON, "Describe a person as JSON.", max_tokens=48)
    jsonschema.validate(out, PERSON)


@STREAM
def test_image(shape: Any, stream: bool) -> None:
    assert shape.image(VISION, stream, max_tokens=6).strip()
    with pytest.raises(ShapeError) as info:  # SmolLM2 reads no images: the documented 400
        shape.image(LOCAL, stream, max_tokens=6)
    assert info.value.status == 400
    if shape.name != "messages":  # Anthropic's envelope has no field name
        assert info.value.field in ("messages", "input", "contents")

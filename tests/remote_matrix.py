"""The remote-provider matrix, shared by its two runs (tests/integration/
test_remote_matrix.py through a real Serve app, tests/unit/test_remote_matrix_local.py
in-process): caller shapes × providers × cases × {stream, non-stream}.

A caller shape is one entry of :data:`SHAPES`: a small adapter over the shape's official
client with ``text``, ``tool_round_trip``, ``json`` and ``image`` (each taking the model
and the stream flag), so the Gemini caller shape (google-genai) is one more entry. The
models are ``m-<provider>`` over the provider fakes (tests/fake_providers.py), which answer
by the rules in tests/fake_agent.py, so :func:`run_cell` checks exactly what came back.
Every cell passes; :data:`DOCUMENTED_400` lists the fields a provider cannot carry.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai

from tests.gemini_shape import ASK_TOOL, PARAMS, PNG_B64, SCHEMA, GeminiShape

PROVIDERS = ["openai", "azure", "anthropic", "gemini"]
PNG = "data:image/png;base64," + PNG_B64
WANT_ARGS = {"city": "Paris"}
WANT_JSON = {"name": "Paris", "age": 1}
WANT_IMAGE = "Saw 1 image(s): image/png"


def engine(provider: str, fakes: dict[str, Any], key_env: str) -> dict[str, Any]:
    """The engine config of the model ``m-<provider>`` over its fake."""
    common = {"api_key_env": key_env, "credential": f"matrix-{provider}",
              "retry": {"max_retries": 0}}
    if provider == "openai":
        return {"type": "openai", "base_url": fakes["openai"].url, "model": "gpt-fake", **common}
    if provider == "azure":
        return {"type": "openai", "base_url": fakes["openai"].url.removesuffix("/v1"),
                "model": "gpt-fake", "azure_deployment": "dep", **common}
    if provider == "anthropic":
        return {"type": "anthropic", "base_url": fakes["anthropic"].url, "model": "claude-fake",
                **common}
    return {"type": "gemini", "base_url": fakes["gemini"].url, "model": "gemini-fake", **common}


# ------------------------------------------------------------------ caller shapes


class ChatShape:
    """``/v1/chat/completions`` through the ``openai`` client."""

    name = "chat"

    def __init__(self, base: str, http_client: Any = None) -> None:
        self.client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                                    timeout=30, http_client=http_client)

    def _call(self, model: str, stream: bool, **kw: Any) -> tuple[str, list[dict[str, str]]]:
        if not stream:
            msg = self.client.chat.completions.create(model=model, **kw).choices[0].message
            return msg.content or "", [{"id": c.id, "name": c.function.name,
                                        "arguments": c.function.arguments}
                                       for c in msg.tool_calls or ()]
        text, calls = "", {}
        for chunk in self.client.chat.completions.create(model=model, stream=True, **kw):
            for choice in chunk.choices:
                text += choice.delta.content or ""
                for tc in choice.delta.tool_calls or ():
                    call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                    call["id"] = tc.id or call["id"]
                    call["name"] = (tc.function and tc.function.name) or call["name"]
                    call["arguments"] += (tc.function and tc.function.arguments) or ""
        return text, [calls[i] for i in sorted(calls)]

    def text(self, model: str, stream: bool) -> str:
        return self._call(model, stream, messages=[{"role": "user", "content": "Say hi"}])[0]

    def tool_round_trip(self, model: str, stream: bool) -> tuple[dict[str, str], str]:
        tools = [{"type": "function", "function": {"name": "get_weather",
                                                   "parameters": PARAMS}}]
        ask = [{"role": "user", "content": ASK_TOOL}]
        _, (call,) = self._call(model, stream, messages=ask, tools=tools)
        history = [*ask, {"role": "assistant", "content": None, "tool_calls": [
            {"id": call["id"], "type": "function",
             "function": {"name": call["name"], "arguments": call["arguments"]}}]},
            {"role": "tool", "tool_call_id": call["id"], "content": '{"temp": 21}'}]
        return call, self._call(model, stream, messages=history, tools=tools)[0]

    def json(self, model: str, stream: bool) -> Any:
        fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA,
                                                      "strict": True}}
        return json.loads(self._call(model, stream, response_format=fmt, messages=[
            {"role": "user", "content": "Who?"}])[0])

    def image(self, model: str, stream: bool) -> str:
        return self._call(model, stream, messages=[{"role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": PNG}}]}])[0]


class ResponsesShape:
    """``/v1/responses`` through the ``openai`` client."""

    name = "responses"

    def __init__(self, base: str, http_client: Any = None) -> None:
        self.client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0,
                                    timeout=30, http_client=http_client)

    def _call(self, model: str, stream: bool, **kw: Any) -> Any:
        if not stream:
            return self.client.responses.create(model=model, **kw)
        events = list(self.client.responses.create(model=model, stream=True, **kw))
        (done,) = [e for e in events if e.type == "response.completed"]
        streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert streamed == done.response.output_text
        return done.response

    def text(self, model: str, stream: bool) -> str:
        return self._call(model, stream, input="Say hi").output_text

    def tool_round_trip(self, model: str, stream: bool) -> tuple[dict[str, str], str]:
        tools = [{"type": "function", "name": "get_weather", "parameters": PARAMS}]
        first = self._call(model, stream, input=ASK_TOOL, tools=tools)
        (item,) = [o for o in first.output if o.type == "function_call"]
        history = [{"role": "user", "content": ASK_TOOL},
                   {"type": "function_call", "call_id": item.call_id, "name": item.name,
                    "arguments": item.arguments},
                   {"type": "function_call_output", "call_id": item.call_id,
                    "output": '{"temp": 21}'}]
        final = self._call(model, stream, input=history, tools=tools)
        call = {"id": item.call_id, "name": item.name, "arguments": item.arguments}
        return call, final.output_text

    def json(self, model: str, stream: bool) -> Any:
        fmt = {"format": {"type": "json_schema", "name": "person", "schema": SCHEMA,
                          "strict": True}}
        return json.loads(self._call(model, stream, input="Who?", text=fmt).output_text)

    def image(self, model: str, stream: bool) -> str:
        return self._call(model, stream, input=[{"role": "user", "content": [
            {"type": "input_text", "text": "What is this?"},
            {"type": "input_image", "image_url": PNG}]}]).output_text


class MessagesShape:
    """``/v1/messages`` through the ``anthropic`` client."""

    name = "messages"

    def __init__(self, base: str, http_client: Any = None) -> None:
        self.client = anthropic.Anthropic(base_url=base, api_key="unused", max_retries=0,
                                          timeout=30, http_client=http_client)

    def _call(self, model: str, stream: bool, **kw: Any) -> Any:
        kw = {"model": model, "max_tokens": 256, **kw}
        if not stream:
            return self.client.messages.create(**kw)
        with self.client.messages.stream(**kw) as s:
            return s.get_final_message()

    @staticmethod
    def _text(message: Any) -> str:
        return "".join(b.text for b in message.content if b.type == "text")

    def text(self, model: str, stream: bool) -> str:
        return self._text(self._call(model, stream, messages=[
            {"role": "user", "content": "Say hi"}]))

    def tool_round_trip(self, model: str, stream: bool) -> tuple[dict[str, str], str]:
        tools = [{"name": "get_weather", "input_schema": PARAMS}]
        ask = [{"role": "user", "content": ASK_TOOL}]
        first = self._call(model, stream, messages=ask, tools=tools)
        assert first.stop_reason == "tool_use"
        (use,) = [b for b in first.content if b.type == "tool_use"]
        history = [*ask, {"role": "assistant", "content": [
            {"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                          "content": '{"temp": 21}'}]}]
        final = self._call(model, stream, messages=history, tools=tools)
        call = {"id": use.id, "name": use.name, "arguments": json.dumps(use.input)}
        return call, self._text(final)

    def json(self, model: str, stream: bool) -> Any:
        return json.loads(self._text(self._call(
            model, stream, messages=[{"role": "user", "content": "Who?"}],
            extra_body={"output_config": {"format": {"type": "json_schema",
                                                     "schema": SCHEMA}}})))

    def image(self, model: str, stream: bool) -> str:
        return self._text(self._call(model, stream, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG_B64}},
            {"type": "text", "text": "What is this?"}]}]))


#: The caller shapes: one entry each (Gemini's is tests/gemini_shape.py, google-genai).
SHAPES = [ChatShape, ResponsesShape, MessagesShape, GeminiShape]
CASES = ["text", "tool_round_trip", "json", "image"]

#: (provider, chat completions fields, the field the 400 names): what a provider's API
#: cannot say (serve_app/gateway/agent_checks.py).
DOCUMENTED_400 = [
    ("anthropic", {"logprobs": True}, "logprobs"),
    ("anthropic", {"presence_penalty": 0.5}, "presence_penalty"),
    ("anthropic", {"logit_bias": {"5": 1}}, "logit_bias"),
    ("gemini", {"logit_bias": {"5": 1}}, "logit_bias"),
    ("gemini", {"parallel_tool_calls": False, "tools": [
        {"type": "function", "function": {"name": "f", "parameters": PARAMS}}]},
     "parallel_tool_calls"),
]


def run_cell(shape: Any, case: str, provider: str, stream: bool) -> None:
    """One cell: ``case`` through ``shape`` to the model on ``provider``, checked."""
    model = f"m-{provider}"
    if case == "text":
        text = shape.text(model, stream)
        assert text and len(text.split()) >= 4  # the fakes' 4..8 words
    elif case == "tool_round_trip":
        call, final = shape.tool_round_trip(model, stream)
        assert call["name"] == "get_weather" and call["id"]
        assert json.loads(call["arguments"]) == WANT_ARGS
        assert final == 'Tool said: {"temp": 21}'
    elif case == "json":
        assert shape.json(model, stream) == WANT_JSON
    else:
        assert shape.image(model, stream) == WANT_IMAGE


def check_400(client: openai.OpenAI, provider: str, extra: dict[str, Any], field: str) -> None:
    """A documented 400: chat completions naming ``field`` and the provider."""
    try:
        client.chat.completions.create(model=f"m-{provider}", **extra, messages=[
            {"role": "user", "content": "hi"}])
    except openai.BadRequestError as exc:
        assert exc.body["param"] == field and provider in exc.body["message"]
    else:
        raise AssertionError(f"{field} on {provider} was not refused")

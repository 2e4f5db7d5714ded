"""Gemini's caller shape as one adapter entry of the caller-shape matrices.

A caller-shape adapter is built as ``Shape(base_url, http_client=None)``, has a ``name``,
drives one official client exactly as users call it and returns plain Python values, so a
matrix test runs the same cells through every shape (each method takes the model and the
stream flag; the keyword defaults are the remote matrix's prompts and fixtures):

* ``text(model, stream) -> str``
* ``tool_round_trip(model, stream) -> (call, final_text)``: a call of ``get_weather``
  (``forced``: the model must call it), its result fed back, the model's text answer;
  ``call`` is ``{"id", "name", "arguments"}`` with the arguments as JSON text;
* ``json(model, stream) -> Any``: output constrained to ``schema``;
* ``image(model, stream) -> str``: an inline PNG and a question.

A refusal is :class:`ShapeError` (the HTTP status and the field the gateway named),
whatever the client's own exception type.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Optional

__all__ = ["ShapeError", "GeminiShape", "PARAMS", "SCHEMA", "PNG_B64", "ASK_TOOL", "RESULT"]

PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
ASK_TOOL = "What is the weather in Paris? Use the tool."
RESULT = '{"temp": 21}'


def _response_of(result: str) -> dict[str, Any]:
    """A tool result as Gemini's ``functionResponse.response`` object."""
    try:
        value = json.loads(result)
    except ValueError:
        value = None
    return value if isinstance(value, dict) else {"result": result}


class ShapeError(Exception):
    """A caller shape's client raised for an HTTP error: its status and the named field."""

    def __init__(self, status: int, field: Optional[str], message: str) -> None:
        super().__init__(f"{status} {field}: {message}")
        self.status = status
        self.field = field


class GeminiShape:
    """The ``google-genai`` client pointed at Troupe by ``base_url`` (its default API version)."""

    name = "gemini"

    def __init__(self, base: str, http_client: Any = None, api_key: str = "unused") -> None:
        from google import genai
        from google.genai import types

        self.types = types
        options = types.HttpOptions(base_url=base, timeout=120_000)
        if http_client is not None:
            options.httpx_client = http_client
        self.client = genai.Client(api_key=api_key, http_options=options)

    def _generate(self, model: str, stream: bool, contents: Any,
                  **config: Any) -> tuple[str, list[Any]]:
        """The answer's text and function calls, streamed or not."""
        from google.genai import errors

        cfg = self.types.GenerateContentConfig(**config)
        try:
            if not stream:
                out = self.client.models.generate_content(model=model, contents=contents, config=cfg)
                parts = out.candidates[0].content.parts or [] if out.candidates else []
                return "".join(p.text or "" for p in parts), list(out.function_calls or [])
            text, calls = [], []
            for chunk in self.client.models.generate_content_stream(
                    model=model, contents=contents, config=cfg):
                for cand in chunk.candidates or []:
                    text.extend(p.text or "" for p in (cand.content.parts or []) if cand.content)
                calls.extend(chunk.function_calls or [])
            return "".join(text), calls
        except errors.APIError as exc:
            details = (exc.details or {}).get("error", {}).get("details") or [{}]
            field = details[0].get("metadata", {}).get("field")
            raise ShapeError(exc.code, field, exc.message or "") from None

    def text(self, model: str, stream: bool, prompt: str = "Say hi",
             max_tokens: Optional[int] = None) -> str:
        return self._generate(model, stream, prompt, max_output_tokens=max_tokens)[0]

    def tool_round_trip(self, model: str, stream: bool, prompt: str = ASK_TOOL,
                        params: Optional[dict[str, Any]] = None, result: str = RESULT,
                        forced: bool = False) -> tuple[dict[str, str], str]:
        types = self.types
        decl = types.Tool(function_declarations=[types.FunctionDeclaration(
            name="get_weather", description="The weather in a city now",
            parameters_json_schema=params or PARAMS)])

        def mode(name: str) -> Any:
            return types.ToolConfig(function_calling_config=types.FunctionCallingConfig(mode=name))

        _text, calls = self._generate(model, stream, prompt, tools=[decl], max_output_tokens=96,
                                      tool_config=mode("ANY") if forced else None)
        (call,) = calls
        history = [
            types.Content(role="user", parts=[types.Part.from_text(text=prompt)]),
            types.Content(role="model", parts=[types.Part(function_call=call)]),
            types.Content(role="user", parts=[types.Part.from_function_response(
                name=call.name, response=_response_of(result))]),
        ]
        final, _ = self._generate(model, stream, history, tools=[decl], max_output_tokens=24,
                                  tool_config=mode("NONE") if forced else None)
        return {"id": call.id or "", "name": call.name or "",
                "arguments": json.dumps(call.args or {})}, final

    def json(self, model: str, stream: bool, schema: Optional[dict[str, Any]] = None,
             prompt: str = "Who?", max_tokens: Optional[int] = None) -> Any:
        text, _ = self._generate(model, stream, prompt, response_mime_type="application/json",
                                 response_json_schema=schema or SCHEMA,
                                 max_output_tokens=max_tokens)
        return json.loads(text)

    def image(self, model: str, stream: bool, prompt: str = "What is this?",
              max_tokens: Optional[int] = None) -> str:
        part = self.types.Part.from_bytes(data=base64.b64decode(PNG_B64), mime_type="image/png")
        return self._generate(model, stream, [part, prompt], max_output_tokens=max_tokens)[0]

"""Gemini's request fields into the internal vocabulary and back, field by field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from serve_app.errors import InvalidRequest, ModelNotFound, RateLimitExceeded, gemini_error_body
from serve_app.http.plumbing import is_gemini_path
from serve_app.policies.layer import credential_of
from serve_app.protocol.gemini import GenerateContentRequest, GenerationConfig, camel_keys
from serve_app.protocol.gemini_out import GeminiStream, candidate, usage_metadata
from serve_app.protocol.gemini_translate import (
    check_generation_config,
    internal_messages,
    json_schema_of,
    logprobs_of,
    response_format_of,
    tool_choice_of,
    tool_specs,
)
from serve_app.protocol.internal import ImagePart, NamedTool, TextChunk, TokenLogprob, ToolCallDelta

PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
WEATHER = {"name": "get_weather", "description": "Weather now",
           "parameters": {"type": "OBJECT", "properties": {
               "city": {"type": "STRING", "maxLength": "20"},
               "days": {"type": "INTEGER", "nullable": True}},
               "required": ["city"], "propertyOrdering": ["city", "days"]}}


def _req(**body: Any) -> GenerateContentRequest:
    body.setdefault("contents", [{"role": "user", "parts": [{"text": "hi"}]}])
    return GenerateContentRequest.model_validate(camel_keys(body))


def _param(fn: Any, *args: Any) -> str:
    with pytest.raises(InvalidRequest) as info:
        fn(*args)
    assert info.value.status == 400
    return info.value.param or ""


def test_contents_system_text_and_images() -> None:
    body = _req(system_instruction={"parts": [{"text": "Be brief."}, {"text": "Be kind."}]},
                contents=[{"role": "user", "parts": [
                    {"text": "What is this?"},
                    {"inline_data": {"mime_type": "image/png", "data": PNG}},
                    {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://x.test/a.jpg"}}]},
                    {"role": "model", "parts": [{"text": "A dot."}, {"text": "Tiny."}]},
                    {"parts": [{"text": "Thanks"}]}])
    msgs = internal_messages(body.system_instruction, body.contents)
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[0].content == "Be brief.\nBe kind."
    assert msgs[1].content == "What is this?"
    images = [p for p in msgs[1].parts if isinstance(p, ImagePart)]
    assert [i.url for i in images] == [f"data:image/png;base64,{PNG}", "https://x.test/a.jpg"]
    assert msgs[2].content == "A dot.Tiny." and not msgs[3].parts
    url_safe = _req(contents=[{"parts": [{"inlineData": {"mimeType": "image/png", "data": "ab-_cd"}}]}])
    (image,) = internal_messages(None, url_safe.contents)[0].parts
    assert isinstance(image, ImagePart) and image.url == "data:image/png;base64,ab+/cd=="


def test_function_calls_get_stable_ids_and_responses_match_them() -> None:
    contents = [
        {"role": "user", "parts": [{"text": "Weather in Oslo and Rome?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
                                    {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}},
                                    {"thought": True, "text": "thinking", "thoughtSignature": "x"}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather", "response": {"result": "3 C"}}},
                                   {"functionResponse": {"name": "get_weather",
                                                         "response": {"t": 20, "sky": "clear"}}}]},
    ]
    first = internal_messages(None, _req(contents=contents).contents)
    again = internal_messages(None, _req(contents=contents).contents)
    assert first == again  # the same history always yields the same ids
    model_turn = first[1]
    assert [c.id for c in model_turn.tool_calls] == ["call_1_0", "call_1_1"]
    assert [json.loads(c.arguments) for c in model_turn.tool_calls] == [{"city": "Oslo"}, {"city": "Rome"}]
    assert model_turn.content == ""  # the thought part is not fed back
    tools = first[2:]
    assert [(t.role, t.tool_call_id, t.name) for t in tools] == [
        ("tool", "call_1_0", "get_weather"), ("tool", "call_1_1", "get_weather")]
    assert tools[0].content == "3 C" and json.loads(tools[1].content) == {"t": 20, "sky": "clear"}


def test_client_ids_are_kept() -> None:
    contents = [{"role": "user", "parts": [{"text": "q"}]},
                {"role": "model", "parts": [{"functionCall": {"id": "a1", "name": "f", "args": {}}},
                                            {"functionCall": {"id": "a2", "name": "f", "args": {}}}]},
                {"role": "user", "parts": [{"functionResponse": {"id": "a2", "name": "f", "response": {"r": 2}}}]}]
    msgs = internal_messages(None, _req(contents=contents).contents)
    assert [c.id for c in msgs[1].tool_calls] == ["a1", "a2"] and msgs[2].tool_call_id == "a2"


@pytest.mark.parametrize("part,param", [
    ({"text": "a", "inlineData": {"mimeType": "image/png", "data": PNG}}, "contents.0.parts.0"),
    ({"inlineData": {"mimeType": "audio/wav", "data": "AAAA"}}, "contents.0.parts.0.inlineData.mimeType"),
    ({"fileData": {"fileUri": "files/abc"}}, "contents.0.parts.0.fileData"),
    ({"executableCode": {"code": "1"}}, "contents.0.parts.0.executableCode"),
    ({"functionCall": {"name": "f"}}, "contents.0.parts.0"),
    ({"thoughtSignature": "x"}, "contents.0.parts.0"),
])
def test_bad_parts_are_400s_naming_the_part(part: dict, param: str) -> None:
    body = _req(contents=[{"role": "user", "parts": [part]}])
    assert _param(internal_messages, None, body.contents) == param


def test_system_instruction_is_text_only() -> None:
    body = _req(system_instruction={"parts": [{"inlineData": {"mimeType": "image/png", "data": PNG}}]})
    assert _param(internal_messages, body.system_instruction, body.contents) == "systemInstruction.parts.0"


def test_gemini_schema_becomes_json_schema() -> None:
    assert json_schema_of(WEATHER["parameters"], "p") == {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                         "days": {"type": ["integer", "null"]}},
        "required": ["city"], "additionalProperties": False}
    nested = {"type": "ARRAY", "items": {"anyOf": [{"type": "STRING", "format": "enum",
                                                    "enum": ["a"]}, {"type": "NUMBER"}]},
              "min_items": "1", "example": [1]}
    assert json_schema_of(nested, "p") == {"type": "array", "minItems": 1, "items": {
        "anyOf": [{"type": "string", "enum": ["a"]}, {"type": "number"}]}}
    assert _param(json_schema_of, {"type": "OBJECT", "oneOf": []}, "p") == "p.oneOf"
    assert _param(json_schema_of, {"type": "TUPLE"}, "p") == "p.type"


def test_function_declarations_become_tool_specs() -> None:
    body = _req(tools=[{"functionDeclarations": [
        WEATHER, {"name": "now", "parameters_json_schema": {"type": "object"},
                  "response_json_schema": {"type": "string"}}, {"name": "ping"}]}])
    specs = tool_specs(body.tools)
    assert [s.name for s in specs] == ["get_weather", "now", "ping"]
    assert specs[0].parameters["properties"]["city"] == {"type": "string", "maxLength": 20}
    assert specs[0].description == "Weather now" and specs[1].parameters == {"type": "object"}
    assert specs[2].parameters == {"type": "object", "properties": {}}


@pytest.mark.parametrize("tools,param", [
    ([{"googleSearch": {}}], "tools.0.googleSearch"),
    ([{"codeExecution": {}}], "tools.0.codeExecution"),
    ([{"functionDeclarations": [{"name": "f", "behavior": "NON_BLOCKING"}]}],
     "tools.0.functionDeclarations.0.behavior"),
    ([{"functionDeclarations": [{"name": "f", "parametersJsonSchema": {"type": 7}}]}],
     "tools.0.functionDeclarations.0.parametersJsonSchema"),
    ([{"functionDeclarations": [{"name": "f"}, {"name": "f"}]}], "tools"),
])
def test_unservable_tools_are_400s(tools: list, param: str) -> None:
    assert _param(tool_specs, _req(tools=tools).tools) == param


def test_function_calling_config_modes() -> None:
    specs = tool_specs(_req(tools=[{"functionDeclarations": [WEATHER, {"name": "now"}, {"name": "x"}]}]).tools)

    def choice(cfg: dict) -> Any:
        return tool_choice_of(_req(tool_config={"functionCallingConfig": cfg}).tool_config, specs)

    assert choice({}) == ("auto", specs) and choice({"mode": "AUTO"})[0] == "auto"
    assert choice({"mode": "NONE"})[0] == "none" and choice({"mode": "ANY"})[0] == "required"
    assert choice({"mode": "ANY", "allowedFunctionNames": ["now"]})[0] == NamedTool("now")
    forced, allowed = choice({"mode": "ANY", "allowed_function_names": ["now", "x"]})
    assert forced == "required" and [s.name for s in allowed] == ["now", "x"]
    where = "toolConfig.functionCallingConfig"
    assert _param(choice, {"mode": "VALIDATED"}) == f"{where}.mode"
    assert _param(choice, {"mode": "AUTO", "allowedFunctionNames": ["now"]}) == f"{where}.allowedFunctionNames"
    assert _param(choice, {"mode": "ANY", "allowedFunctionNames": ["nope"]}) == f"{where}.allowedFunctionNames"
    assert _param(tool_choice_of, _req(tool_config={"functionCallingConfig": {"mode": "ANY"}}).tool_config,
                  ()) == f"{where}.mode"


def test_response_formats() -> None:
    def fmt(**cfg: Any) -> Any:
        return response_format_of(GenerationConfig.model_validate(cfg))

    assert fmt() is None and fmt(responseMimeType="text/plain") is None
    assert fmt(responseMimeType="application/json").type == "json_object"
    by_schema = fmt(responseMimeType="application/json", responseSchema=WEATHER["parameters"])
    assert by_schema.type == "json_schema" and by_schema.strict
    assert by_schema.schema["properties"]["days"] == {"type": ["integer", "null"]}
    js = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert fmt(response_mime_type="application/json", response_json_schema=js).schema == js
    with pytest.raises(InvalidRequest) as info:
        fmt(responseSchema=js)
    assert info.value.param == "generationConfig.responseMimeType"
    with pytest.raises(InvalidRequest) as info:
        fmt(responseMimeType="text/x.enum")
    assert info.value.param == "generationConfig.responseMimeType"


def test_generation_config_sampling_and_refusals() -> None:
    cfg = GenerationConfig.model_validate({"responseLogprobs": True, "logprobs": 3,
                                           "thinkingConfig": {"thinkingBudget": 0},
                                           "responseModalities": ["TEXT"]})
    check_generation_config(cfg)
    assert logprobs_of(cfg) == 3
    assert logprobs_of(GenerationConfig(response_logprobs=True)) == 0
    assert logprobs_of(GenerationConfig()) is None
    assert _param(logprobs_of, GenerationConfig(logprobs=2)) == "generationConfig.logprobs"
    for field, value in [("topK", 3), ("speechConfig", {}), ("mediaResolution", "MEDIA_RESOLUTION_LOW"),
                         ("responseModalities", ["IMAGE"]), ("enableEnhancedCivicAnswers", True)]:
        cfg = GenerationConfig.model_validate({field: value})
        assert _param(check_generation_config, cfg) == f"generationConfig.{field}"


def test_output_candidates_usage_and_stream() -> None:
    calls = [ToolCallDelta(0, "call_x", "get_weather", '{"city": "Oslo"}')]
    lp = [TokenLogprob("Hi", 5, -0.5, (("Hi", 5, -0.5), ("Yo", 6, -1.5)))]
    out = candidate(0, "Hi", calls, "tool_calls", lp, top=1)
    assert out["finishReason"] == "STOP"
    assert out["content"]["parts"] == [
        {"text": "Hi"}, {"functionCall": {"id": "call_x", "name": "get_weather", "args": {"city": "Oslo"}}}]
    assert out["logprobsResult"]["chosenCandidates"] == [{"token": "Hi", "tokenId": 5, "logProbability": -0.5}]
    assert len(out["logprobsResult"]["topCandidates"][0]["candidates"]) == 1
    assert candidate(1, "x", None, "length")["finishReason"] == "MAX_TOKENS"
    assert usage_metadata(3, 4, 2) == {"promptTokenCount": 3, "candidatesTokenCount": 4,
                                       "totalTokenCount": 7, "cachedContentTokenCount": 2}
    stream = GeminiStream("m", "rid", 0)
    first = json.loads(stream.event(0, TextChunk("Hel", 1, prompt_tokens=3)) or "")
    assert first["candidates"][0]["content"]["parts"] == [{"text": "Hel"}]
    assert "finishReason" not in first["candidates"][0] and first["responseId"] == "rid"
    assert stream.event(0, TextChunk("", 1, tool_calls=[ToolCallDelta(0, "c", "f", '{"a"')])) is None
    last = json.loads(stream.event(0, TextChunk("", 0, "tool_calls", 3, 5, tool_calls=[
        ToolCallDelta(0, arguments=": 1}")])) or "")
    assert last["candidates"][0]["content"]["parts"] == [{"functionCall": {"id": "c", "name": "f", "args": {"a": 1}}}]
    assert last["usageMetadata"]["totalTokenCount"] == 8


def test_error_envelope_paths_and_keys() -> None:
    body = gemini_error_body(ModelNotFound("no such model", param="model"), "req_1")["error"]
    assert (body["code"], body["status"]) == (404, "NOT_FOUND")
    assert body["details"][0]["metadata"]["field"] == "model"
    assert gemini_error_body(RateLimitExceeded("slow down"))["error"]["status"] == "RESOURCE_EXHAUSTED"
    assert gemini_error_body(InvalidRequest("bad"))["error"]["status"] == "INVALID_ARGUMENT"
    assert is_gemini_path({"path": "/p/v1beta/models", "root_path": "/p"})
    assert not is_gemini_path({"path": "/v1/models"})
    assert credential_of({"headers": [(b"x-goog-api-key", b"trp_a")]}) == "trp_a"
    assert credential_of({"path": "/v1beta/models/m:generateContent", "headers": [],
                          "query_string": b"alt=sse&key=trp_b"}) == "trp_b"
    assert credential_of({"path": "/v1/chat/completions", "headers": [],
                          "query_string": b"key=trp_b"}) is None

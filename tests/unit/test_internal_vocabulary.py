"""The internal vocabulary (issue 15): what every route translates into and engines read."""

from __future__ import annotations

import pickle

import pytest

from serve_app.protocol.internal import (
    ChatMessage,
    ChunkJoiner,
    GenerationRequest,
    ImagePart,
    NamedTool,
    ResponseFormat,
    SamplingParams,
    TextChunk,
    TextPart,
    TokenLogprob,
    ToolCall,
    ToolCallDelta,
    ToolSpec,
    merge_tool_call_deltas,
)


def _agent_request() -> GenerationRequest:
    weather = ToolSpec("get_weather", "Weather by city", {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
    return GenerationRequest(
        "r1",
        SamplingParams(logprobs=3, presence_penalty=0.5, logit_bias={42: -100.0}),
        messages=[
            ChatMessage("user", "What is this?", parts=(
                TextPart("What is this?"), ImagePart("data:image/png;base64,AAAA", "low"))),
            ChatMessage("assistant", "", tool_calls=(
                ToolCall("call_1", "get_weather", '{"city": "Oslo"}'),)),
            ChatMessage("tool", '{"temp": 3}', tool_call_id="call_1"),
        ],
        tools=(weather,),
        tool_choice=NamedTool("get_weather"),
        response_format=ResponseFormat("json_schema", {"type": "object"}, "answer", True),
    )


def test_defaults_keep_a_plain_text_request_plain():
    req = GenerationRequest("r", prompt="hi")
    assert req.tools == () and req.tool_choice == "auto" and req.parallel_tool_calls
    assert req.response_format is None and not req.raw and not req.has_images()
    assert req.sampling.logprobs is None and req.sampling.logit_bias == {}
    assert req.sampling.presence_penalty == 0.0 and not req.sampling.echo


def test_logit_bias_default_is_not_shared_between_requests():
    a, b = SamplingParams(), SamplingParams()
    a.logit_bias[1] = 5.0
    assert b.logit_bias == {}


def test_a_full_agent_request_survives_pickling_as_it_crosses_a_ray_handle():
    req = _agent_request()
    back = pickle.loads(pickle.dumps(req))
    assert back == req
    assert back.has_images()
    assert back.tool_named("get_weather").parameters["required"] == ["city"]
    assert back.tool_named("nope") is None
    assert back.messages[1].tool_calls[0].arguments == '{"city": "Oslo"}'


def test_a_json_schema_format_needs_a_schema():
    with pytest.raises(ValueError, match="schema"):
        ResponseFormat("json_schema")
    assert ResponseFormat("json_object").schema is None


def test_streamed_tool_call_fragments_reassemble_in_index_order():
    deltas = [
        ToolCallDelta(0, "call_a", "get_weather", ""),
        ToolCallDelta(0, arguments='{"city": '),
        ToolCallDelta(1, "call_b", "get_time", '{"tz"'),
        ToolCallDelta(0, arguments='"Oslo"}'),
        ToolCallDelta(1, arguments=': "UTC"}'),
    ]
    assert merge_tool_call_deltas(deltas) == [
        ToolCall("call_a", "get_weather", '{"city": "Oslo"}'),
        ToolCall("call_b", "get_time", '{"tz": "UTC"}'),
    ]


def test_joined_chunk_carries_text_logprobs_and_whole_tool_calls():
    lp = [TokenLogprob("a", 1, -0.1, (("a", 1, -0.1), ("b", 2, -2.0))), TokenLogprob("b", 2, -0.5)]
    joiner = ChunkJoiner()
    joiner.add(TextChunk("a", 1, logprobs=lp[:1], prompt_tokens=4))
    joiner.add(TextChunk("b", 1, logprobs=lp[1:], tool_calls=[ToolCallDelta(0, "c", "f", "{")]))
    last = TextChunk("", 0, "tool_calls", 4, 2, tool_calls=[ToolCallDelta(0, arguments="}")])
    joiner.add(last)
    out = joiner.joined(last, 1.5, True)
    assert (out.text, out.finish_reason, out.usage()["total_tokens"]) == ("ab", "tool_calls", 6)
    assert out.logprobs == lp and out.queue_ms == 1.5 and out.cold_start
    assert out.tool_calls == [ToolCallDelta(0, "c", "f", "{}")]


def test_joined_chunk_without_extras_has_none():
    joiner = ChunkJoiner()
    last = TextChunk("hi", 1, "stop", 2, 1)
    joiner.add(last)
    out = joiner.joined(last, None, False)
    assert out.logprobs is None and out.tool_calls is None and out.text == "hi"


def test_a_token_id_prompt_is_carried_as_a_tuple():
    req = GenerationRequest("r", prompt_token_ids=(1, 2, 3))
    assert req.prompt is None and req.messages is None
    assert pickle.loads(pickle.dumps(req)).prompt_token_ids == (1, 2, 3)

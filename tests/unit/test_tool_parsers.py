"""Tool calls out of local model output (hermes auto mode, forced calls), the chat
rendering of tools, and the per-sequence output shaping."""

from __future__ import annotations

import json

import pytest

from deployments.engines.chat_render import render_messages, template_renders_tools
from deployments.engines.sequence_output import SequenceOutput
from deployments.engines.tool_parsers import ForcedCallParser, HermesToolParser
from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import (
    ChatMessage,
    GenerationRequest,
    NamedTool,
    SamplingParams,
    ToolCall,
    ToolSpec,
    merge_tool_call_deltas,
)
from tests.unit.byte_tokenizer import byte_tokenizer

WEATHER = ToolSpec("weather", "Weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
CLOCK = ToolSpec("clock", None, {"type": "object", "properties": {}})
PLAIN_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
TOOLS_TEMPLATE = "{% if tools %}TOOLS{{ tools|length }}{% endif %}" + PLAIN_TEMPLATE


def run(parser, pieces: list[str]):
    """Feed ``pieces`` then finish; returns (text, deltas)."""
    text, deltas = [], []
    for piece in pieces:
        t, d = parser.feed(piece)
        text.append(t)
        deltas.extend(d)
    t, d = parser.finish()
    return "".join(text) + t, deltas + d


def chars(text: str) -> list[str]:
    return list(text)


def test_hermes_splits_text_and_calls_arriving_byte_by_byte():
    out = 'Let me check.<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parser = HermesToolParser((WEATHER, CLOCK))
    text, deltas = run(parser, chars(out))
    assert text == "Let me check."
    [call] = merge_tool_call_deltas(deltas)
    assert call.name == "weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_") and deltas[0].id == call.id and deltas[0].arguments == ""
    assert parser.calls_made == 1


def test_hermes_keeps_invalid_calls_as_text_and_numbers_parallel_calls():
    # Held whole (arguments before name), so checked before anything is sent.
    bad = '<tool_call>{"arguments": {"town": 3}, "name": "weather"}</tool_call>'
    parser = HermesToolParser((WEATHER,))
    text, deltas = run(parser, [bad, " ok"])
    assert text == bad + " ok" and deltas == [] and parser.calls_made == 0
    assert "schema" in parser.rejected[0]
    unknown = '<tool_call>{"name": "nope", "arguments": {}}</tool_call>'
    assert run(HermesToolParser((WEATHER,)), [unknown]) == (unknown, [])
    # Streamed (its head named a tool): already sent when it closes, so only recorded.
    streamed = HermesToolParser((WEATHER,))
    run(streamed, ['<tool_call>{"name": "weather", "arguments": {"town": 3}}</tool_call>'])
    assert streamed.calls_made == 1 and "already streamed" in streamed.rejected[0]
    two = ('<tool_call>{"name": "weather", "arguments": {"city": "A"}}</tool_call>'
           '<tool_call>{"name": "clock", "arguments": {}}</tool_call>')
    calls = merge_tool_call_deltas(run(HermesToolParser((WEATHER, CLOCK)), [two])[1])
    assert [c.name for c in calls] == ["weather", "clock"]
    single = HermesToolParser((WEATHER, CLOCK), parallel=False)
    assert [c.name for c in merge_tool_call_deltas(run(single, [two])[1])] == ["weather"]


def test_hermes_holds_back_only_a_possible_tag_and_accepts_an_unclosed_call():
    parser = HermesToolParser((WEATHER,))
    assert parser.feed("a <tool") == ("a ", [])
    assert parser.feed("box> b")[0] == "<toolbox> b"
    text, deltas = run(HermesToolParser((WEATHER,)), ['<tool_call>{"name": "weather", "arguments": {"city": "X"}}'])
    assert text == "" and merge_tool_call_deltas(deltas)[0].name == "weather"


@pytest.mark.parametrize("step", [1, 4, 10_000])
def test_hermes_auto_call_streams_name_first_then_fragments_that_reassemble_to_the_whole(step):
    args = {"city": "Paris", "notes": "a long note " * 20, "days": [1, 2, 3], "deep": {"a": {"b": "}"}}}
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    long_tool = ToolSpec("forecast", None, schema)
    out = ('Checking.<tool_call>\n{"name": "forecast", "arguments": ' + json.dumps(args)
           + '}\n</tool_call> done')
    pieces = [out[i : i + step] for i in range(0, len(out), step)]
    streamed_text, deltas = run(HermesToolParser((long_tool,)), pieces)
    whole_text, whole = run(HermesToolParser((long_tool,)), [out])
    assert streamed_text == whole_text == "Checking. done"
    assert deltas[0].name == "forecast" and deltas[0].id and deltas[0].arguments == ""
    assert all(d.name is None and d.id is None for d in deltas[1:])
    [call] = merge_tool_call_deltas(deltas)
    [unary] = merge_tool_call_deltas(whole)
    assert (call.name, call.arguments) == (unary.name, unary.arguments)
    assert json.loads(call.arguments) == args
    if step < 100:
        assert len(deltas) > 10  # fragments while the model writes, not one blob at the end
    # Announced, and the arguments begun, before the model has finished writing them.
    cut = out.index('"arguments": ') + len('"arguments": ') + 20
    early = HermesToolParser((long_tool,)).feed(out[:cut])[1]
    assert early[0].name == "forecast" and early[1].arguments == json.dumps(args)[:20]


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_forced_required_call_streams_name_first_then_argument_fragments(step):
    out = '{"name":"weather","arguments":{"city":"Paris, \\"FR\\"}"}}'
    pieces = [out[i : i + step] for i in range(0, len(out), step)]
    text, deltas = run(ForcedCallParser(), pieces)
    assert text == "" and deltas[0].name == "weather" and deltas[0].id
    assert all(d.name is None for d in deltas[1:])
    [call] = merge_tool_call_deltas(deltas)
    assert json.loads(call.arguments) == {"city": 'Paris, "FR"}'}
    if step == 1:
        assert len(deltas) > 5  # fragments as they arrive, not one blob at the end


def test_forced_named_call_streams_the_arguments():
    text, deltas = run(ForcedCallParser("weather"), ['{"ci', 'ty":"Oslo"}'])
    assert [(d.name, d.arguments) for d in deltas] == [("weather", ""), (None, '{"ci'), (None, 'ty":"Oslo"}')]


def _req(messages, **kw) -> GenerationRequest:
    return GenerationRequest("r", SamplingParams(), messages=messages, **kw)


def test_a_template_without_tools_gets_the_hermes_convention_in_the_system_turn():
    tok = byte_tokenizer(PLAIN_TEMPLATE)
    assert not template_renders_tools(tok)
    history = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
    ]
    turns, tools = render_messages(_req(history, tools=(WEATHER,)), tok)
    assert tools is None
    assert turns[0]["content"].startswith("Be brief.") and '"name": "weather"' in turns[0]["content"]
    assert "<tool_call>" in turns[0]["content"]
    assert turns[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert turns[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    named, _ = render_messages(_req([ChatMessage("user", "hi")], tools=(WEATHER,), tool_choice=NamedTool("weather")), tok)
    assert "arguments of a call to the function weather" in named[0]["content"]
    untouched, _ = render_messages(_req([ChatMessage("user", "hi")], tools=(WEATHER,), tool_choice="none"), tok)
    assert untouched == [{"role": "user", "content": "hi"}]


def test_a_template_with_tools_renders_them_itself():
    tok = byte_tokenizer(TOOLS_TEMPLATE)
    assert template_renders_tools(tok)
    call = ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "weather", '{"city": "Rome"}'),))
    turns, tools = render_messages(_req([ChatMessage("user", "hi"), call], tools=(WEATHER,)), tok)
    assert tools == [{"type": "function", "function": {
        "name": "weather", "parameters": WEATHER.parameters, "description": "Weather in a city"}}]
    assert turns[1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": {"city": "Rome"}}


def test_sequence_output_reports_tool_calls_and_needs_a_parser_for_auto():
    tok = byte_tokenizer(PLAIN_TEMPLATE)
    out = SequenceOutput(_req([], tools=(WEATHER,)), tok, "hermes")
    text, logprobs, deltas = out.shape('<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>', final=True)
    assert text == "" and logprobs is None and deltas[0].name == "weather"
    assert out.finish_reason("stop") == "tool_calls" and out.finish_reason("length") == "length"
    plain = SequenceOutput(_req([]), tok, "hermes")
    assert plain.shape("hello", final=True) == ("hello", None, None) and plain.finish_reason("stop") == "stop"
    with pytest.raises(InvalidRequest) as err:
        SequenceOutput(_req([], tools=(WEATHER,)), tok, None)
    assert err.value.param == "tool_choice"
    forced = SequenceOutput(_req([], tools=(WEATHER,), tool_choice="required"), tok, None)
    assert len(forced.processors) == 1  # the grammar

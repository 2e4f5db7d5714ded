"""Local-engine logits processing: grammar constraints and their cache, penalties, logit
bias, logprobs, and the per-request factory (on a tiny in-memory byte tokenizer)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deployments.engines.constraints import GrammarCache, GrammarProcessor, constraint_schema
from deployments.engines.logits import (
    LogitBiasProcessor,
    LogprobRecorder,
    PenaltyProcessor,
    build_logits_processors,
    check_logit_bias,
    grammar_of,
    token_logprobs,
)
from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import (
    GenerationRequest,
    NamedTool,
    ResponseFormat,
    SamplingParams,
    ToolSpec,
)
from tests.unit.byte_tokenizer import byte_tokenizer, ids_of

POINT = {
    "type": "object",
    "properties": {"x": {"type": "integer"}, "tag": {"enum": ["a", "b"]}},
    "required": ["x", "tag"],
    "additionalProperties": False,
}
WEATHER = ToolSpec("weather", "Weather in a city", {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
    "additionalProperties": False})
CLOCK = ToolSpec("clock", None, {"type": "object", "properties": {}, "additionalProperties": False})


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def request(**kw) -> GenerationRequest:
    sampling = kw.pop("sampling", SamplingParams())
    return GenerationRequest("r", sampling, messages=[], **kw)


def walk(tok, proc, text: str) -> list[int]:
    """Feed ``text`` byte by byte through ``proc``; returns how many tokens each step allowed."""
    ids = torch.tensor([[ids_of(tok, "!")[0]]])  # a one-token prompt
    allowed = []
    for token in ids_of(tok, text):
        scores = proc(ids, torch.zeros(1, len(tok)))
        assert scores[0, token] == 0, f"{tok.decode([token])!r} was masked"
        allowed.append(int(torch.isfinite(scores[0]).sum()))
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    proc(ids, torch.zeros(1, len(tok)))
    return allowed


def test_grammar_allows_exactly_the_schema_and_says_when_complete(tok):
    cache = GrammarCache(tok)
    proc = GrammarProcessor(cache.matcher(POINT), cache.vocab_size)
    allowed = walk(tok, proc, '{"x":-12,"tag":"b"}')
    assert allowed[0] == 1  # only "{" may start
    assert proc.complete()
    # A value outside the enum is masked at the first byte that leaves it.
    proc = GrammarProcessor(cache.matcher(POINT), cache.vocab_size)
    with pytest.raises(AssertionError, match="'c' was masked"):
        walk(tok, proc, '{"x":1,"tag":"c"}')


def test_accept_advances_now_and_the_next_call_does_not_repeat_it(tok):
    cache = GrammarCache(tok)
    proc = GrammarProcessor(cache.matcher({"type": "boolean"}), cache.vocab_size)
    ids = torch.tensor([[1]])
    text = "true"
    for i, token in enumerate(ids_of(tok, text)):
        proc(ids, torch.zeros(1, len(tok)))
        done = proc.accept(token)
        ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        assert done == (i == len(text) - 1)


def test_cache_hits_by_schema_hash_and_is_bounded(tok):
    cache = GrammarCache(tok, max_entries=2)
    cache.matcher(POINT)
    cache.matcher(json.loads(json.dumps(POINT, sort_keys=True)))  # same schema, other key order
    assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)
    cache.matcher({"type": "integer"})
    cache.matcher({"type": "string"})
    assert len(cache) == 2
    cache.matcher(POINT)  # evicted (least recently used): compiled again
    assert cache.misses == 4


def test_unsupported_keyword_is_a_400_naming_it(tok):
    cache = GrammarCache(tok)
    with pytest.raises(InvalidRequest, match="uniqueItems") as err:
        cache.matcher({"type": "array", "uniqueItems": True}, "response_format")
    assert err.value.param == "response_format"
    with pytest.raises(InvalidRequest, match="format"):
        cache.matcher({"type": "string", "format": "no-such-format"})


def test_constraint_schema_per_request_kind():
    assert constraint_schema(request()) == (None, "")
    assert constraint_schema(request(response_format=ResponseFormat("text"))) == (None, "")
    assert constraint_schema(request(response_format=ResponseFormat("json_object"))) == (
        {"type": "object"}, "response_format")
    fmt = ResponseFormat("json_schema", POINT, "point", True)
    assert constraint_schema(request(response_format=fmt)) == (POINT, "response_format")
    named = request(tools=(WEATHER, CLOCK), tool_choice=NamedTool("weather"))
    assert constraint_schema(named) == (WEATHER.parameters, "tools")
    one = constraint_schema(request(tools=(WEATHER,), tool_choice="required"))[0]
    assert one["properties"]["name"] == {"const": "weather"}
    both = constraint_schema(request(tools=(WEATHER, CLOCK), tool_choice="required"))[0]
    assert [s["properties"]["name"]["const"] for s in both["anyOf"]] == ["weather", "clock"]
    assert constraint_schema(request(tools=(WEATHER,), tool_choice="none")) == (None, "")


def test_bad_tool_choices_are_400s():
    with pytest.raises(InvalidRequest, match="'nope'") as err:
        constraint_schema(request(tools=(WEATHER,), tool_choice=NamedTool("nope")))
    assert err.value.param == "tool_choice"
    with pytest.raises(InvalidRequest, match="at least one tool"):
        constraint_schema(request(tool_choice="required"))


def test_logit_bias_checks_keys_and_values(tok):
    assert check_logit_bias({"5": 10, 7: -100}, len(tok)) == {5: 10.0, 7: -100.0}
    with pytest.raises(InvalidRequest, match="-1, 257, abc") as err:
        check_logit_bias({"-1": 1, "257": 1, "abc": 1, "3": 1}, len(tok))
    assert err.value.param == "logit_bias"
    with pytest.raises(InvalidRequest, match="keys: 4"):
        check_logit_bias({"4": 101}, len(tok))
    scores = LogitBiasProcessor({3: 5.0, 9: -100.0})(torch.tensor([[1]]), torch.zeros(1, 16))
    assert scores[0, 3] == 5 and scores[0, 9] == -100 and scores[0, 4] == 0


def test_penalties_count_only_the_output():
    proc = PenaltyProcessor(presence=0.5, frequency=1.0)
    prompt = torch.tensor([[4, 4, 4]])
    assert torch.equal(proc(prompt, torch.zeros(1, 8)), torch.zeros(1, 8))  # no output yet
    scores = proc(torch.tensor([[4, 4, 4, 2, 2, 5]]), torch.zeros(1, 8))
    assert scores[0, 2] == -2.5 and scores[0, 5] == -1.5 and scores[0, 4] == 0


def test_token_logprobs_from_processed_scores(tok):
    scores = torch.tensor([[2.0, 1.0, float("-inf"), 0.0]])
    entry = token_logprobs(scores, 1, 2)
    expected = 1.0 - math.log(math.exp(2) + math.exp(1) + 1)
    assert entry.token_id == 1 and entry.logprob == pytest.approx(expected)
    assert [t[1] for t in entry.top] == [0, 1]
    assert token_logprobs(scores, 2, 0).logprob == -9999.0  # masked: finite for JSON
    recorder = LogprobRecorder(1, tok)
    assert recorder.take(3) is None
    a = ids_of(tok, "A")[0]
    row = torch.zeros(1, len(tok))
    row[0, a] = 5.0
    recorder(torch.tensor([[1]]), row)
    assert recorder.take(a).top[0] == ("A", a, recorder.take(a).logprob) and recorder.take(a).token == "A"


def test_factory_builds_in_order_and_rejects_bad_fields(tok):
    sp = SamplingParams(logit_bias={1: 2.0}, presence_penalty=0.1, logprobs=3)
    procs = build_logits_processors(request(sampling=sp, response_format=ResponseFormat("json_object")), tok)
    assert [type(p).__name__ for p in procs] == ["LogitBiasProcessor", "PenaltyProcessor", "GrammarProcessor"]
    assert grammar_of(procs) is procs[2]
    assert build_logits_processors(request(), tok) == []
    with pytest.raises(InvalidRequest) as err:
        build_logits_processors(request(sampling=SamplingParams(logprobs=21)), tok)
    assert err.value.param == "top_logprobs"
    with pytest.raises(InvalidRequest) as err:
        build_logits_processors(request(sampling=SamplingParams(frequency_penalty=2.5)), tok)
    assert err.value.param == "frequency_penalty"

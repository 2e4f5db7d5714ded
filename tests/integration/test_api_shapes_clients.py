"""The official ``openai`` (Responses API) and ``anthropic`` (Messages API) clients against the
real Serve app with mock engines."""

from __future__ import annotations

import time

import anthropic
import httpx
import openai
import pytest
from anthropic import Anthropic
from openai import OpenAI

from tests.conftest import wait_until
from tests.mock_app import engine_active

QUESTION = "Tell me about actors"
USER = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def oai(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


@pytest.fixture(scope="module")
def claude(base_url: str) -> Anthropic:
    # The client appends /v1/messages itself and sends x-api-key + anthropic-version.
    return Anthropic(base_url=base_url, api_key="sk-ant-unused", max_retries=0, timeout=30)


# ----------------------------------------------------------------- Responses


def test_responses_unary_incomplete_and_completed(oai: OpenAI) -> None:
    r = oai.responses.create(model="mock-5ms", input=QUESTION, max_output_tokens=7)
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert len(r.output_text.split()) == 7
    assert r.usage.output_tokens == 7
    assert r.usage.total_tokens == r.usage.input_tokens + 7
    done = oai.responses.create(
        model="mock-5ms", instructions="Be brief.", max_output_tokens=300,
        input=[{"role": "user", "content": [{"type": "input_text", "text": QUESTION}]}],
    )
    assert done.status == "completed" and done.incomplete_details is None
    assert 64 <= done.usage.output_tokens <= 96  # the mock's natural answer length
    assert done.output[0].content[0].type == "output_text"


def test_responses_stream_events_match_unary(oai: OpenAI) -> None:
    unary = oai.responses.create(model="mock-5ms", input=QUESTION, max_output_tokens=12, temperature=0)
    events = list(oai.responses.create(
        model="mock-5ms", input=QUESTION, max_output_tokens=12, temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) >= 2 and "".join(deltas) == unary.output_text
    final = events[-1].response
    assert final.output_text == unary.output_text and final.usage.output_tokens == 12


def test_responses_stream_helper_accumulates_the_final_response(oai: OpenAI) -> None:
    with oai.responses.stream(model="mock-5ms", input=QUESTION, max_output_tokens=300) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == text


def test_responses_errors(oai: OpenAI, base_url: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        oai.responses.create(model="gpt-nope", input=QUESTION)
    assert info.value.body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model="mock-5ms", input=QUESTION, previous_response_id="resp_123")
    assert info.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model="mock-5ms", input=QUESTION, tools=[{"type": "web_search"}])
    assert info.value.body["param"] == "tools.0.type"
    # A failure after the stream started: an error event, then response.failed.
    events = list(oai.responses.create(model="mock-fail", input=QUESTION, stream=True,
                                       max_output_tokens=10))
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    assert events[-2].code == "inference_failed"
    assert events[-1].response.status == "failed"


# ------------------------------------------------------------------ Messages


def test_messages_unary(claude: Anthropic) -> None:
    m = claude.messages.create(model="mock-5ms", max_tokens=7, messages=USER)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 7
    assert len(m.content[0].text.split()) == 7
    done = claude.messages.create(
        model="mock-5ms", max_tokens=300, system="Be brief.", messages=USER, extra_body={"top_k": 5})
    assert done.stop_reason == "end_turn" and 64 <= done.usage.output_tokens <= 96
    assert done.usage.input_tokens > m.usage.input_tokens  # the system prompt counted
    words = done.content[0].text.split()
    stopped = claude.messages.create(model="mock-5ms", max_tokens=300, messages=USER,
                                     system="Be brief.", stop_sequences=["zzz-absent", " " + words[3]])
    if len(set(words[:4])) == 4:  # the stop word does not occur earlier in the answer
        assert stopped.content[0].text == " ".join(words[:3])
    assert stopped.stop_reason == "stop_sequence"
    assert stopped.stop_sequence == " " + words[3]


def test_messages_stream_raw_events_and_helper(claude: Anthropic) -> None:
    # This client version no longer has sampling keywords; the wire still takes them.
    greedy = {"temperature": 0}
    unary = claude.messages.create(model="mock-5ms", max_tokens=12, messages=USER, extra_body=greedy)
    events = list(claude.messages.create(
        model="mock-5ms", max_tokens=12, messages=USER, extra_body=greedy, stream=True))
    types = [e.type for e in events]  # the client drops the ping
    assert types[:2] == ["message_start", "content_block_start"]
    assert types[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    deltas = [e.delta.text for e in events if e.type == "content_block_delta"]
    assert len(deltas) >= 2 and "".join(deltas) == unary.content[0].text
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 12
    with claude.messages.stream(model="mock-5ms", max_tokens=300, messages=USER) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert final.content[0].text == text and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == len(text.split())


def test_messages_errors_in_anthropic_envelope(claude: Anthropic, http: httpx.Client) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        claude.messages.create(model="claude-nope", max_tokens=5, messages=USER)
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model="mock-5ms", max_tokens=5,
                               messages=[{"role": "assistant", "content": "Hi"}])
    assert "role 'user'" in info.value.body["error"]["message"]
    # The client will not send a request without max_tokens; a raw one gets a 400 naming it.
    r = http.post("/v1/messages", json={"model": "mock-5ms", "messages": USER},
                  headers={"x-api-key": "k", "anthropic-version": "2023-06-01"})
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in r.json()["error"]["message"]


def test_messages_error_after_stream_started(claude: Anthropic) -> None:
    seen: list[str] = []
    with pytest.raises(anthropic.APIStatusError) as info:
        for event in claude.messages.create(
            model="mock-fail", max_tokens=10, messages=USER, stream=True
        ):
            seen.append(event.type)
    assert seen[:2] == ["message_start", "content_block_start"]
    assert "content_block_delta" in seen  # tokens arrived before the failure
    assert info.value.body["error"]["type"] == "api_error"


# -------------------------------------------------------------- cancellation


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_closing_a_stream_stops_the_engine(
    api: str, oai: OpenAI, claude: Anthropic, http: httpx.Client
) -> None:
    if api == "responses":
        stream = oai.responses.create(model="mock-slow", input=QUESTION, stream=True,
                                      max_output_tokens=400)
        is_delta = lambda e: e.type == "response.output_text.delta"  # noqa: E731
    else:
        stream = claude.messages.create(model="mock-slow", max_tokens=400, messages=USER,
                                        stream=True)
        is_delta = lambda e: e.type == "content_block_delta"  # noqa: E731
    deltas = 0
    for event in stream:
        deltas += is_delta(event)
        if deltas == 3:
            break
    # The engine is generating this request right now (so the check below can fail).
    assert engine_active(http, "mock-slow") >= 1
    stream.close()
    closed_at = time.monotonic()
    wait_until(lambda: engine_active(http, "mock-slow") == 0, timeout=5)
    assert time.monotonic() - closed_at < 2.0


# --------------------------------------------------------- metering, tracing


def test_both_routes_are_metered_priced_and_traced(
    oai: OpenAI, claude: Anthropic, http: httpx.Client
) -> None:
    # Requests of earlier tests (a cancelled stream ends late) must be done before t0.
    wait_until(lambda: http.get("/health").json()["in_flight_requests"] == 0, timeout=10)
    t0 = time.time()
    r = oai.responses.create(model="mock-5ms", input=QUESTION, max_output_tokens=5)
    events = list(oai.responses.create(model="mock-5ms", input=QUESTION, max_output_tokens=6,
                                       stream=True))
    trace_id = "5cf92f3577b34da6a3ce929d0e0e4731"
    m = claude.messages.create(
        model="mock-5ms", max_tokens=7, messages=USER,
        extra_headers={"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.create(model="mock-5ms", max_tokens=7, messages=[])

    def usage() -> dict:
        body = http.get("/v1/usage", params={"group_by": "route", "start": t0}).json()
        return {g["group"]: g for g in body["groups"]}

    groups = wait_until(
        lambda: (u := usage()).get("/v1/messages", {}).get("requests") == 2 and u,
        timeout=15, interval=0.2)
    responses, messages = groups["/v1/responses"], groups["/v1/messages"]
    assert (responses["requests"], responses["errors"]) == (2, 0)
    assert responses["completion_tokens"] == 5 + 6
    assert responses["prompt_tokens"] == r.usage.input_tokens + events[-1].response.usage.input_tokens
    assert (messages["requests"], messages["errors"]) == (2, 1)  # the empty one was rejected
    assert messages["completion_tokens"] == 7 and messages["prompt_tokens"] == m.usage.input_tokens
    price_in, price_out = 0.5, 1.5  # mock-5ms's pricing in tests/mock_app.py
    assert messages["cost_usd"] == pytest.approx(
        (m.usage.input_tokens * price_in + 7 * price_out) / 1e6, abs=1e-9)
    assert responses["latency_ms"]["ttft"]["count"] == 2

    def trace() -> dict | None:
        for t in http.get("/traces", params={"limit": 50}).json()["data"]:
            if t["trace_id"] == trace_id and t["span_count"] >= 3:
                return t
        return None

    spans = wait_until(trace, timeout=20, interval=0.2)["spans"]
    assert "POST /v1/messages" in {s["name"] for s in spans}
    assert {"deployment.stream", "engine.generate"} <= {s["name"] for s in spans}

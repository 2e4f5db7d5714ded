"""The official openai client against the real Serve app (mock engines)."""

from __future__ import annotations

import httpx
import openai
import pytest
from openai import OpenAI

MSG = [{"role": "user", "content": "Tell me about actors"}]


@pytest.fixture(scope="module")
def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_list_and_retrieve_models(client: OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert {"mock-5ms", "mock-slow"} <= set(ids)
    assert client.models.retrieve("mock-5ms").id == "mock-5ms"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("no-such-model")
    assert info.value.body["code"] == "model_not_found"


def test_chat_completion_unary(client: OpenAI) -> None:
    r = client.chat.completions.create(model="mock-5ms", messages=MSG, max_tokens=7)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7
    assert len(r.choices[0].message.content.split()) == 7
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7


def test_chat_stream_with_usage_matches_unary_at_temperature_zero(client: OpenAI) -> None:
    unary = client.chat.completions.create(
        model="mock-5ms", messages=MSG, max_tokens=12, temperature=0
    )
    stream = client.chat.completions.create(
        model="mock-5ms", messages=MSG, max_tokens=12, temperature=0,
        stream=True, stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[0].choices[0].delta.role == "assistant"
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) >= 2  # streamed, not one blob


def test_max_completion_tokens_wins_and_stop_and_seed(client: OpenAI) -> None:
    r = client.chat.completions.create(
        model="mock-5ms", messages=MSG, max_tokens=30, max_completion_tokens=4
    )
    assert r.usage.completion_tokens == 4
    full = client.chat.completions.create(model="mock-5ms", messages=MSG, max_tokens=10, temperature=0)
    words = full.choices[0].message.content.split()
    stopped = client.chat.completions.create(
        model="mock-5ms", messages=MSG, max_tokens=10, temperature=0, stop=[" " + words[3]]
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == " ".join(words[:3])
    a = client.chat.completions.create(model="mock-5ms", messages=MSG, max_tokens=8, seed=1, temperature=1)
    b = client.chat.completions.create(model="mock-5ms", messages=MSG, max_tokens=8, seed=1, temperature=1)
    c = client.chat.completions.create(model="mock-5ms", messages=MSG, max_tokens=8, seed=2, temperature=1)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.choices[0].message.content != c.choices[0].message.content


def test_completions_unary_and_stream(client: OpenAI) -> None:
    r = client.completions.create(model="mock-5ms", prompt="Once upon a time", max_tokens=5, temperature=0)
    assert r.object == "text_completion" and r.usage.completion_tokens == 5
    chunks = list(client.completions.create(
        model="mock-5ms", prompt="Once upon a time", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True},
    ))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 5


def test_n_choices_and_a_bad_n_is_a_clear_400(client: OpenAI) -> None:
    out = client.chat.completions.create(model="mock-5ms", messages=MSG, n=2, max_tokens=3)
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens == 6
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="mock-5ms", messages=MSG, n=0)
    assert info.value.body["param"] == "n"


def test_unknown_model_is_404_in_openai_envelope(client: OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-nope", messages=MSG)
    body = info.value.body
    assert body["type"] == "not_found_error" and body["code"] == "model_not_found"
    assert "mock-5ms" in body["message"]  # says what is available


def test_context_length_is_400(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="mock-small-ctx", messages=MSG, max_tokens=1000)
    assert info.value.body["code"] == "context_length_exceeded"


def test_stream_error_before_first_token_gets_real_status(client: OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        list(client.chat.completions.create(
            model="mock-small-ctx", messages=MSG, max_tokens=1000, stream=True
        ))


def test_error_after_stream_started_is_a_final_error_event(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=30) as h:
        r = h.post("/v1/chat/completions", json={
            "model": "mock-fail", "messages": MSG, "stream": True, "max_tokens": 10})
    assert r.status_code == 200
    events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert '"error"' in events[-2] and "inference_failed" in events[-2]
    assert sum('"content"' in e for e in events[1:-2]) >= 1  # tokens came before the error
    # the openai client surfaces it as an APIError instead of hanging
    client = OpenAI(base_url=base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError):
        list(client.chat.completions.create(model="mock-fail", messages=MSG, stream=True, max_tokens=10))


def test_unknown_fields_are_accepted(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={
        "model": "mock-5ms", "messages": MSG, "max_tokens": 2,
        "logit_bias": {"50256": -100}, "parallel_tool_calls": False, "brand_new_field": 1})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "body, param",
    [
        (b"", None),
        (b"{not json", None),
        (b"[1, 2]", None),
        (b'{"model": "mock-5ms", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None),
        (b'{"model": "mock-5ms", "messages": []}', "messages"),
        (b'{"model": "mock-5ms"}', "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
        (b'{"model": "mock-5ms", "messages": [{"role": "wizard", "content": "x"}]}', "messages.0.role"),
        (b'{"model": "mock-5ms", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
        (b'{"model": "mock-5ms", "messages": [{"role": "user", "content": "x"}], "max_tokens": "many"}', "max_tokens"),
        (b'{"model": "mock-5ms", "messages": [{"role": "user", "content": "x"}], "temperature": 9}', "temperature"),
        (b'{"model": "mock-5ms", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', "messages.0.content"),
        (b'{"model": "mock-5ms", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}', "stop"),
    ],
)
def test_bad_input_is_400_in_openai_envelope(http: httpx.Client, body: bytes, param) -> None:
    r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["code"] == "invalid_request"
    assert err["message"] and "example" in err["message"].lower() or err["param"]
    if param is not None:
        assert err["param"] == param
    assert r.headers["x-request-id"] == err["request_id"]


def test_oversized_body_is_413(http: httpx.Client) -> None:
    r = http.post("/v1/chat/completions", json={
        "model": "mock-5ms", "messages": [{"role": "user", "content": "x" * 70000}]})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"


def test_request_ids(http: httpx.Client) -> None:
    a = http.get("/v1/models")
    b = http.get("/v1/models", headers={"X-Client-Request-Id": "client-abc"})
    assert len(a.headers.get_list("x-request-id")) == 1 and len(a.headers["x-request-id"]) >= 16
    assert a.headers["x-request-id"] != b.headers["x-request-id"]
    assert b.headers["x-client-request-id"] == "client-abc"
    missing = http.get("/v1/nothing-here")
    assert missing.status_code == 404 and "x-request-id" in missing.headers
    assert missing.json()["error"]["type"] == "not_found_error"

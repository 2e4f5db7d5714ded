"""Anthropic and Gemini engines against their fake upstreams (tests/fake_providers.py):
request, response, stream, usage and error translation checked field by field."""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Iterator

import aiohttp
import pytest

from deployments.engines.remote import breaker

from deployments.engines.registry import create_text_engine
from deployments.engines.remote.anthropic import AnthropicTextEngine
from deployments.engines.remote.gemini import GeminiTextEngine
from deployments.engines.remote import StreamState
from serve_app.settings import AnthropicEngineConfig, GeminiEngineConfig
from serve_app.errors import (
    AuthenticationFailed,
    ContentFiltered,
    ContextLengthExceeded,
    InferenceFailed,
    PaymentRequired,
    RateLimitExceeded,
    TroupeError,
)
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams
from tests.fake_openai import fake_embedding, prompt_tokens_for, reply_tokens
from tests.fake_providers import FakeAnthropic, FakeGemini

A_ENV, G_ENV = "TROUPE_TEST_ANTHROPIC_KEY", "TROUPE_TEST_GEMINI_KEY"
A_KEY, G_KEY = "ak-test-ANTHROPIC-SENTINEL", "g-test-GEMINI-SENTINEL"
FAST = {"connect_timeout_s": 2, "first_byte_timeout_s": 2, "idle_timeout_s": 2,
        "total_timeout_s": 8, "retry": {"max_retries": 1, "backoff_base_s": 0.01}}


@pytest.fixture(scope="module")
def anthropic() -> Iterator[FakeAnthropic]:
    with FakeAnthropic() as fake:
        yield fake


@pytest.fixture(scope="module")
def gemini() -> Iterator[FakeGemini]:
    with FakeGemini() as fake:
        yield fake


@pytest.fixture(autouse=True)
def _fresh(anthropic: FakeAnthropic, gemini: FakeGemini, monkeypatch: pytest.MonkeyPatch):
    for fake in (anthropic, gemini):
        fake.wait_open_streams(0, timeout=2)
        fake.reset()
    monkeypatch.setenv(A_ENV, A_KEY)
    breaker._BREAKERS.clear()  # breakers are per process: start each test closed
    monkeypatch.setenv(G_ENV, G_KEY)


@pytest.fixture
async def claude(anthropic: FakeAnthropic) -> AsyncIterator[AnthropicTextEngine]:
    eng = create_text_engine("claude", AnthropicEngineConfig(
        base_url=anthropic.url, model="claude-fake", api_key_env=A_ENV,
        credential="anthropic-test", default_max_tokens=64, **FAST))
    await eng.start()
    yield eng
    await eng.shutdown()


@pytest.fixture
async def gem(gemini: FakeGemini) -> AsyncIterator[GeminiTextEngine]:
    eng = create_text_engine("gem", GeminiEngineConfig(
        base_url=gemini.url, model="gemini-fake", api_key_env=G_ENV, credential="gemini-test",
        context_length=4096, **FAST))
    await eng.start()
    yield eng
    await eng.shutdown()


def chat(text: str = "Tell me a story", **sampling: Any) -> GenerationRequest:
    return GenerationRequest("r1", SamplingParams(**sampling), [
        ChatMessage("system", "Be brief."), ChatMessage("user", "Hi"),
        ChatMessage("assistant", "Hello!"), ChatMessage("user", text)])


async def collect(engine: Any, request: GenerationRequest | None = None) -> list[Any]:
    return [o async for o in engine.generate(request or chat())]


async def raised(engine: Any, request: GenerationRequest | None = None) -> TroupeError:
    with pytest.raises(TroupeError) as info:
        await collect(engine, request)
    return info.value


# ------------------------------------------------------------------ Anthropic


async def test_anthropic_request_translation(claude, anthropic):
    await collect(claude, chat(temperature=1.7, top_p=0.9, stop=("END",), max_tokens=20))
    req = anthropic.requests[-1]
    assert req.path == "/v1/messages"
    assert req.headers["x-api-key"] == A_KEY and req.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in req.headers
    assert req.body == {
        "model": "claude-fake", "max_tokens": 20, "stream": True,
        "system": "Be brief.",
        "messages": [{"role": "user", "content": "Hi"},
                     {"role": "assistant", "content": "Hello!"},
                     {"role": "user", "content": "Tell me a story"}],
        "temperature": 1.0, "top_p": 0.9, "stop_sequences": ["END"],
    }
    await collect(claude, GenerationRequest("r2", SamplingParams(), prompt="Once"))
    body = anthropic.requests[-1].body
    assert body["max_tokens"] == 64 and body["messages"] == [{"role": "user", "content": "Once"}]
    assert "system" not in body and "top_p" not in body and "stop_sequences" not in body


async def test_anthropic_stream_text_usage_and_finish(claude, anthropic):
    outputs = await collect(claude)
    expected = reply_tokens("Tell me a story")
    assert [o.text for o in outputs[:-1]] == expected
    final = outputs[-1]
    turns = [*anthropic.requests[-1].body["messages"], {"content": "Be brief."}]
    assert final.finish_reason == "stop" and final.prompt_tokens == prompt_tokens_for(turns)
    assert sum(o.num_tokens for o in outputs) == len(expected)
    assert all(o.prompt_tokens == final.prompt_tokens for o in outputs)  # from message_start


async def test_anthropic_max_tokens_stop_is_length(claude, anthropic):
    anthropic.configure(reply_tokens=10)
    outputs = await collect(claude, chat(max_tokens=3))
    assert outputs[-1].finish_reason == "length" and sum(o.num_tokens for o in outputs) == 3


async def test_anthropic_non_stream_message_translation(claude, anthropic):
    async with aiohttp.ClientSession() as s:
        async with s.post(anthropic.url + "/v1/messages", json={
            "model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "Yo"}]},
            headers={"x-api-key": A_KEY}) as r:
            body = await r.json()
    state = StreamState()
    outs = claude.on_json(body, state)
    final = claude._final(state)
    assert [o.text for o in outs] == ["".join(reply_tokens("Yo")[:2])]
    assert (final.finish_reason, final.prompt_tokens) == ("length", body["usage"]["input_tokens"])
    assert sum(o.num_tokens for o in [*outs, final]) == body["usage"]["output_tokens"] == 2


@pytest.mark.parametrize("status, cls, retried", [
    (400, ContextLengthExceeded, False), (402, PaymentRequired, False),
    (429, RateLimitExceeded, True), (529, InferenceFailed, True), (500, InferenceFailed, True),
])
async def test_anthropic_error_mapping(claude, anthropic, status, cls, retried):
    anthropic.configure(status=status, retry_after="0" if status == 429 else None)
    err = await raised(claude)
    assert type(err) is cls
    assert err.details["upstream_status"] == status
    assert err.details["upstream_error"]["type"] in (
        "invalid_request_error", "billing_error", "rate_limit_error", "overloaded_error",
        "api_error")
    assert len(anthropic.requests) == (2 if retried else 1)


async def test_anthropic_refusal_and_error_event(claude, anthropic):
    anthropic.enqueue(finish_reason="refusal")
    assert isinstance(await raised(claude), ContentFiltered)
    anthropic.enqueue(error_after_chunks=0)  # overloaded before any text: retried
    assert (await collect(claude))[-1].finish_reason == "stop"
    anthropic.enqueue(error_after_chunks=2)  # after text reached the client: not retried
    err = await raised(claude)
    assert isinstance(err, InferenceFailed) and "overloaded" in err.message.lower()


async def test_anthropic_401_never_leaks_the_key(claude, anthropic):
    anthropic.valid_keys = {"someone-else"}
    err = await raised(claude)
    assert isinstance(err, AuthenticationFailed) and A_KEY not in repr((err.message, err.details))


async def test_anthropic_cancel_closes_the_upstream_stream(claude, anthropic):
    anthropic.configure(reply_tokens=5, stall_after_chunks=1)
    stream = claude.generate(chat())
    assert (await stream.__anext__()).text
    await stream.aclose()
    await anthropic.await_open_streams(0, 2)
    assert claude.active_requests() == 0


# ------------------------------------------------------------------ Gemini


async def test_gemini_request_translation(gem, gemini):
    await collect(gem, chat(temperature=0.3, top_p=0.8, stop=("END",), max_tokens=20, seed=5))
    req = gemini.requests[-1]
    assert req.path == "/v1beta/models/gemini-fake:streamGenerateContent"
    assert req.headers["x-goog-api-key"] == G_KEY and G_KEY not in str(req.path)
    assert req.body == {
        "contents": [{"role": "user", "parts": [{"text": "Hi"}]},
                     {"role": "model", "parts": [{"text": "Hello!"}]},
                     {"role": "user", "parts": [{"text": "Tell me a story"}]}],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "generationConfig": {"temperature": 0.3, "topP": 0.8, "maxOutputTokens": 20,
                             "stopSequences": ["END"], "seed": 5},
    }


async def test_gemini_stream_text_usage_and_finish(gem, gemini):
    outputs = await collect(gem)
    expected = reply_tokens("Tell me a story")
    assert [o.text for o in outputs[:-1]] == expected
    final = outputs[-1]
    texts = [{"content": "Hi"}, {"content": "Hello!"}, {"content": "Tell me a story"},
             {"content": "Be brief."}]
    assert final.finish_reason == "stop" and final.prompt_tokens == prompt_tokens_for(texts)
    assert sum(o.num_tokens for o in outputs) == len(expected)


async def test_gemini_max_tokens_and_non_stream(gem, gemini):
    gemini.configure(reply_tokens=10)
    outputs = await collect(gem, chat(max_tokens=4))
    assert outputs[-1].finish_reason == "length" and sum(o.num_tokens for o in outputs) == 4
    async with aiohttp.ClientSession() as s:
        async with s.post(gemini.url + "/models/gemini-fake:generateContent", json={
            "contents": [{"role": "user", "parts": [{"text": "Yo"}]}],
            "generationConfig": {"maxOutputTokens": 3}},
            headers={"x-goog-api-key": G_KEY}) as r:
            body = await r.json()
    state = StreamState()
    outs = gem.on_json(body, state)
    final = gem._final(state)
    assert [o.text for o in outs] == ["".join(reply_tokens("Yo", 10)[:3])]
    assert final.finish_reason == "length"
    assert final.prompt_tokens == body["usageMetadata"]["promptTokenCount"]
    assert sum(o.num_tokens for o in [*outs, final]) == 3


@pytest.mark.parametrize("status, cls, retried", [
    (400, ContextLengthExceeded, False), (429, RateLimitExceeded, True),
    (503, InferenceFailed, True),
])
async def test_gemini_error_mapping(gem, gemini, status, cls, retried):
    gemini.configure(status=status, retry_after="0" if status == 429 else None)
    err = await raised(gem)
    assert type(err) is cls and err.details["upstream_error"]["code"] == status
    assert len(gemini.requests) == (2 if retried else 1)


async def test_gemini_bad_key_is_authentication_failed_and_refreshes_once(
    gem, gemini, monkeypatch
):
    gemini.valid_keys = {"g-rotated"}
    err = await raised(gem)
    assert isinstance(err, AuthenticationFailed) and len(gemini.requests) == 1
    assert G_KEY not in repr((err.message, err.details))
    # Rotated in the environment after the request captured its key: one retry on it.
    real = gem._creds.current
    state = {"n": 0}

    def current():
        state["n"] += 1
        if state["n"] > 1:
            monkeypatch.setenv(G_ENV, "g-rotated")
        return real()

    monkeypatch.setattr(gem._creds, "current", current)
    assert (await collect(gem))[-1].finish_reason == "stop"
    assert [r.headers["x-goog-api-key"] for r in gemini.requests[-2:]] == [G_KEY, "g-rotated"]


@pytest.mark.parametrize("reason", ["SAFETY", "PROHIBITED_CONTENT", "RECITATION"])
async def test_gemini_safety_finish_is_content_filtered(gem, gemini, reason):
    gemini.configure(finish_reason=reason, reply_tokens=1)
    assert isinstance(await raised(gem), ContentFiltered)


def test_gemini_blocked_prompt_is_content_filtered(gem):
    with pytest.raises(ContentFiltered):
        gem.on_event('{"promptFeedback": {"blockReason": "SAFETY"}}', StreamState())


async def test_gemini_error_event_mid_stream(gem, gemini):
    gemini.enqueue(error_after_chunks=2)
    err = await raised(gem)
    assert isinstance(err, InferenceFailed) and err.details["upstream_error"]["code"] == 503


async def test_gemini_embeddings(gem, gemini):
    vectors, tokens = await gem.embed(["a b", "c"])
    assert vectors == [fake_embedding("a b"), fake_embedding("c")] and tokens == 0
    assert gemini.requests[-1].body["requests"][0]["model"] == "models/gemini-fake"


async def test_gemini_thought_tokens_count_as_output(gem):
    state = StreamState()
    gem.on_event('{"candidates": [{"content": {"parts": [{"text": "x"}]}, '
                 '"finishReason": "STOP"}], "usageMetadata": {"promptTokenCount": 4, '
                 '"candidatesTokenCount": 2, "thoughtsTokenCount": 5}}', state)
    assert (state.prompt_tokens, state.completion_tokens, state.finish_reason) == (4, 7, "stop")
    await asyncio.sleep(0)


def test_every_provider_rejects_a_stream_event_that_is_not_json(claude, gem):
    """RemoteEngine.event_json: one decoding of SSE events for all three providers."""
    from serve_app.settings import OpenAIEngineConfig

    oa = create_text_engine("oa", OpenAIEngineConfig(
        base_url="http://127.0.0.1:9/v1", model="gpt-x", api_key_env="TROUPE_TEST_UNUSED_KEY"))
    for engine in (oa, claude, gem):
        with pytest.raises(InferenceFailed, match="sent a stream event that is not JSON") as info:
            engine.on_event("{not json", StreamState())
        assert info.value.details == {"provider": engine.provider, "event": "{not json"}
        assert engine.on_event("[1, 2]", StreamState()) is None  # JSON, but not an event object

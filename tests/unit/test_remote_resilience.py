"""The shared remote transport (deployments/engines/remote/) against the fake
OpenAI upstream: retries, Retry-After, breaker, 401 refresh, classification, Azure, JSON."""

from __future__ import annotations

import logging
import random
import time
from typing import Any, AsyncIterator, Iterator

import pytest

from deployments.engines.remote import breaker

from deployments.engines.remote import CircuitBreaker, backoff_delay, retry_after_seconds
from deployments.engines.remote.openai import OpenAITextEngine
from serve_app.settings import OpenAIEngineConfig
from serve_app.errors import (
    AuthenticationFailed,
    ContentFiltered,
    ContextLengthExceeded,
    InferenceFailed,
    Overloaded,
    PaymentRequired,
    RateLimitExceeded,
    Timeout,
    TroupeError,
)
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams
from tests.fake_openai import FakeOpenAI, fake_embedding, reply_tokens

KEY_ENV = "TROUPE_TEST_RESILIENCE_KEY"
KEY = "sk-test-RESILIENCE-SENTINEL-42"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.wait_open_streams(0, timeout=2)
    fake.reset()
    monkeypatch.setenv(KEY_ENV, KEY)
    breaker._BREAKERS.clear()  # breakers are per process: start each test closed


def config(fake: FakeOpenAI, **overrides: Any) -> OpenAIEngineConfig:
    fields: dict[str, Any] = {
        "base_url": fake.url, "model": "gpt-fake", "api_key_env": KEY_ENV,
        "credential": "resilience-test", "connect_timeout_s": 2, "first_byte_timeout_s": 2,
        "idle_timeout_s": 2, "total_timeout_s": 8,
        "retry": {"max_retries": 2, "backoff_base_s": 0.01, "backoff_max_s": 0.05},
        "breaker": {"failure_threshold": 3, "reset_timeout_s": 0.3},
    }
    fields.update(overrides)
    return OpenAIEngineConfig(**fields)


@pytest.fixture
async def make(fake: FakeOpenAI) -> AsyncIterator[Any]:
    made: list[OpenAITextEngine] = []

    async def factory(**overrides: Any) -> OpenAITextEngine:
        eng = OpenAITextEngine("remote-chat", config(fake, **overrides))
        await eng.start()
        made.append(eng)
        return eng

    yield factory
    for eng in made:
        await eng.shutdown()


def chat(text: str = "Say something nice", **sampling: Any) -> GenerationRequest:
    return GenerationRequest("req-1", SamplingParams(**sampling), [ChatMessage("user", text)])


async def run(engine: OpenAITextEngine, request: GenerationRequest | None = None) -> str:
    return "".join([o.text async for o in engine.generate(request or chat())])


async def fails(engine: OpenAITextEngine) -> TroupeError:
    with pytest.raises(TroupeError) as info:
        await run(engine)
    return info.value


# ------------------------------------------------------------------ retries


@pytest.mark.parametrize("status", [408, 409, 429, 500, 502, 503])
async def test_retryable_statuses_are_retried_then_succeed(make, fake, status):
    eng = await make()
    fake.enqueue(status=status)
    fake.enqueue(status=status)
    assert await run(eng) == "".join(reply_tokens("Say something nice"))
    assert len(fake.requests) == 3 and eng.counters["retries"] == 2


async def test_retries_give_up_after_max_retries(make, fake):
    eng = await make()
    fake.configure(status=503)
    err = await fails(eng)
    assert isinstance(err, InferenceFailed) and err.details["upstream_status"] == 503
    assert len(fake.requests) == 3


async def test_retry_after_is_honored(make, fake):
    eng = await make()
    fake.enqueue(status=429, retry_after="0.4")
    started = time.monotonic()
    await run(eng)
    assert time.monotonic() - started >= 0.4
    assert len(fake.requests) == 2


async def test_a_long_retry_after_ends_at_once_with_the_hint(make, fake):
    eng = await make()
    fake.configure(status=429, retry_after="30")
    started = time.monotonic()
    err = await fails(eng)
    assert isinstance(err, RateLimitExceeded) and err.retry_after_s == 30
    assert err.headers() == {"Retry-After": "30"}
    assert time.monotonic() - started < 1 and len(fake.requests) == 1


async def test_connection_errors_are_retried(make, fake):
    eng = await make(base_url="http://127.0.0.1:9/v1")
    err = await fails(eng)
    assert isinstance(err, InferenceFailed) and eng.counters["retries"] == 2


async def test_slow_first_byte_is_retried_and_named(make, fake):
    eng = await make(first_byte_timeout_s=0.2)
    fake.enqueue(headers_delay_s=1)
    assert await run(eng)
    assert eng.counters["retries"] == 1
    fake.configure(headers_delay_s=1)
    err = await fails(eng)
    assert isinstance(err, Timeout) and err.details["phase"] == "first_byte"


async def test_no_retry_after_the_first_byte_reached_the_client(make, fake):
    eng = await make()
    fake.enqueue(reply_tokens=6, error_after_chunks=2)
    seen = []
    with pytest.raises(InferenceFailed):
        async for out in eng.generate(chat()):
            seen.append(out.text)
    assert len(seen) == 2 and len(fake.requests) == 1


async def test_a_stall_mid_stream_times_out_as_idle_without_retry(make, fake):
    eng = await make(idle_timeout_s=0.2)
    fake.enqueue(reply_tokens=6, stall_after_chunks=2)
    with pytest.raises(Timeout) as info:
        await run(eng)
    assert info.value.details["phase"] == "idle" and len(fake.requests) == 1


async def test_a_stream_that_fails_before_any_content_is_retried(make, fake):
    eng = await make()
    fake.enqueue(reply_tokens=6, error_after_chunks=0)
    assert await run(eng) and len(fake.requests) == 2


def test_backoff_is_exponential_with_full_jitter_and_capped():
    rng = random.Random(1)
    for attempt in range(6):
        caps = min(1.0, 0.1 * 2 ** attempt)
        samples = [backoff_delay(attempt, 0.1, 1.0, rng) for _ in range(200)]
        assert all(0 <= s <= caps for s in samples) and max(samples) > caps * 0.8


def test_retry_after_forms():
    assert retry_after_seconds({"Retry-After": "3"}) == 3
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert 0 <= retry_after_seconds({"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"}) < 1
    assert retry_after_seconds({"Retry-After": "soon"}) is None
    assert retry_after_seconds({}) is None


# ------------------------------------------------------------------ breaker


async def test_breaker_opens_fails_fast_then_half_open_probe_closes_it(make, fake):
    eng = await make(retry={"max_retries": 0})
    fake.configure(status=500)
    for _ in range(3):
        assert isinstance(await fails(eng), InferenceFailed)
    sent = len(fake.requests)
    err = await fails(eng)
    assert isinstance(err, Overloaded) and err.status == 503 and err.retry_after_s >= 0.1
    assert len(fake.requests) == sent  # failed fast: nothing sent upstream
    assert KEY not in repr(err.details)
    time.sleep(0.35)
    fake.configure(status=200)
    assert await run(eng)  # the half-open probe succeeds
    assert list(eng.stats()["breakers"].values()) == ["closed"]


def test_breaker_half_open_allows_limited_probes_and_reopens_on_failure():
    b = CircuitBreaker(threshold=2, reset_s=0.05, probes=1)
    b.failure(b.acquire())
    b.failure(b.acquire())
    assert b.state == "open" and b.acquire() is None
    time.sleep(0.06)
    probe = b.acquire()
    assert probe is True and b.acquire() is None  # one probe at a time
    b.failure(probe)
    assert b.state == "open"
    time.sleep(0.06)
    b.success(b.acquire())
    assert b.state == "closed" and b.acquire() is False


async def test_client_errors_do_not_open_the_breaker(make, fake):
    eng = await make()
    fake.configure(status=400)
    for _ in range(5):
        assert isinstance(await fails(eng), ContextLengthExceeded)
    assert len(fake.requests) == 5


# ------------------------------------------------------------------ classification


async def test_context_length_is_400_without_retry(make, fake):
    eng = await make()
    fake.configure(status=400)
    err = await fails(eng)
    assert type(err) is ContextLengthExceeded and err.status == 400
    assert err.details["upstream_error"]["code"] == "context_length_exceeded"
    assert len(fake.requests) == 1


async def test_content_filter_error_and_finish_reason(make, fake):
    eng = await make()
    fake.enqueue(status=400, error_code="content_filter", error_message="filtered")
    err = await fails(eng)
    assert type(err) is ContentFiltered and err.code == "CONTENT_FILTERED"
    assert err.details["upstream_error"]["message"] == "filtered" and len(fake.requests) == 1
    fake.enqueue(finish_reason="content_filter")
    with pytest.raises(ContentFiltered):
        await run(eng)
    assert len(fake.requests) == 2  # not retried


@pytest.mark.parametrize("behaviour", [
    {"status": 429, "error_code": "insufficient_quota", "error_message": "quota"},
    {"status": 402, "error_message": "pay up"},
])
async def test_quota_is_payment_required_without_retry(make, fake, behaviour):
    eng = await make()
    fake.configure(**behaviour)
    err = await fails(eng)
    assert type(err) is PaymentRequired and err.status == 402 and len(fake.requests) == 1


async def test_429_keeps_the_provider_body_in_details(make, fake):
    eng = await make(retry={"max_retries": 0})
    fake.configure(status=429, retry_after="2")
    err = await fails(eng)
    assert isinstance(err, RateLimitExceeded) and err.retry_after_s == 2
    assert err.details["upstream_error"]["code"] == "rate_limit_exceeded"


async def test_401_without_a_newer_key_fails_once_and_never_leaks(make, fake, caplog):
    caplog.set_level(logging.DEBUG)
    eng = await make()
    fake.valid_keys = {"sk-someone-else"}
    err = await fails(eng)
    assert isinstance(err, AuthenticationFailed) and len(fake.requests) == 1
    assert KEY not in repr((err.message, err.details)) + caplog.text


async def test_401_retries_once_on_a_rotated_key(make, fake, monkeypatch):
    eng = await make()
    fake.valid_keys = {"sk-rotated-1"}
    # The key changes while the request is in flight: the 401 makes it look again.
    fake.enqueue()
    real = eng._creds.current

    calls = {"n": 0}

    def current():
        calls["n"] += 1
        if calls["n"] > 1:
            monkeypatch.setenv(KEY_ENV, "sk-rotated-1")
        return real()

    monkeypatch.setattr(eng._creds, "current", current)
    assert await run(eng)
    assert [r.api_key for r in fake.requests] == [KEY, "sk-rotated-1"]
    assert eng.counters["auth_refreshes"] == 1 and fake.unauthorized == 1


# ------------------------------------------------------------------ shapes


async def test_azure_url_shape_and_api_key_header(make, fake):
    eng = await make(base_url=fake.url.removesuffix("/v1"), azure_deployment="gpt4o-prod",
                     api_version="2024-10-21")
    assert await run(eng)
    req = fake.requests[-1]
    assert req.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert req.headers["api-key"] == KEY and "Authorization" not in req.headers
    assert "model" not in req.body and eng.provider == "azure"


async def test_service_tier_is_sent_when_set(make, fake):
    eng = await make()
    request = chat()
    request.service_tier = "flex"
    await run(eng, request)
    assert fake.requests[-1].body["service_tier"] == "flex"
    await run(eng)
    assert "service_tier" not in fake.requests[-1].body


async def test_non_streaming_json_answer_is_accepted(make, fake):
    eng = await make()
    from deployments.engines.remote import StreamState

    state = StreamState()
    outs = eng.on_json({"choices": [{"message": {"content": "hi there"},
                                     "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 5, "completion_tokens": 2}}, state)
    assert [o.text for o in outs] == ["hi there"]
    final = eng._final(state)
    assert (final.finish_reason, final.prompt_tokens, final.num_tokens) == ("length", 5, 1)


async def test_embeddings(make, fake):
    eng = await make()
    vectors, tokens = await eng.embed(["hello world", "bye"])
    assert vectors == [fake_embedding("hello world"), fake_embedding("bye")] and tokens == 3
    assert fake.requests[-1].path == "/v1/embeddings"
    fake.enqueue(status=503)
    assert (await eng.embed(["x"]))[0] == [fake_embedding("x")]  # retried


async def test_the_breaker_is_shared_by_engines_using_the_same_upstream_and_key(make, fake):
    first = await make(retry={"max_retries": 0})
    second = await make(retry={"max_retries": 0})
    fake.configure(status=502)
    for _ in range(3):
        await fails(first)
    sent = len(fake.requests)
    assert isinstance(await fails(second), Overloaded) and len(fake.requests) == sent

"""The remote OpenAI engine against a real fake upstream on loopback (tests/fake_openai.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, AsyncIterator, Iterator

import pytest

from deployments.engines.remote import breaker

from deployments.engines.base import TextEngine
from deployments.engines.registry import create_text_engine
from deployments.engines.remote.openai import OpenAITextEngine, SSEParser
from serve_app.settings import OpenAIEngineConfig
from serve_app.errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    ContextLengthExceeded,
    InferenceFailed,
    InvalidRequest,
    RateLimitExceeded,
    Timeout,
    TroupeError,
)
from serve_app.protocol.internal import ChatMessage, EngineOutput, GenerationRequest, SamplingParams
from tests.fake_openai import FakeOpenAI, prompt_tokens_for, reply_tokens

KEY_ENV = "TROUPE_TEST_FAKE_OPENAI_KEY"
SENTINEL_KEY = "sk-test-SENTINEL-0123456789abcdef"


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(autouse=True)
def _fresh(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    fake.wait_open_streams(0, timeout=2)  # a previous test's closed stream is gone
    fake.reset()
    monkeypatch.setenv(KEY_ENV, SENTINEL_KEY)
    breaker._BREAKERS.clear()  # breakers are per process: start each test closed


def make_config(fake: FakeOpenAI, **overrides: Any) -> OpenAIEngineConfig:
    fields: dict[str, Any] = {
        "base_url": fake.url, "model": "gpt-fake", "api_key_env": KEY_ENV,
        "context_length": 8192, "connect_timeout_s": 2, "first_byte_timeout_s": 3,
        "idle_timeout_s": 3, "total_timeout_s": 8, "retry": {"max_retries": 0},
    }
    fields.update(overrides)
    return OpenAIEngineConfig(**fields)


@pytest.fixture
async def engine(fake: FakeOpenAI) -> AsyncIterator[OpenAITextEngine]:
    eng = OpenAITextEngine("remote-chat", make_config(fake))
    await eng.start()
    try:
        yield eng
    finally:
        await eng.shutdown()


def chat(text: str = "Say something nice", request_id: str = "req-1", **sampling: Any):
    return GenerationRequest(
        request_id=request_id,
        messages=[ChatMessage("system", "Be brief."), ChatMessage("user", text)],
        sampling=SamplingParams(**sampling),
    )


async def collect(engine: OpenAITextEngine, request: GenerationRequest) -> list[EngineOutput]:
    return [out async for out in engine.generate(request)]


async def raised(engine: OpenAITextEngine, request: GenerationRequest) -> TroupeError:
    with pytest.raises(TroupeError) as info:
        await collect(engine, request)
    return info.value


# ------------------------------------------------------------------ streaming and usage


async def test_streams_deltas_and_final_output_carries_exact_usage(engine, fake):
    outputs = await collect(engine, chat("Tell me a story"))
    expected = reply_tokens("Tell me a story")
    assert [o.text for o in outputs[:-1]] == expected
    final = outputs[-1]
    assert final.finish_reason == "stop" and final.text == ""
    assert all(o.finish_reason is None for o in outputs[:-1])
    body = fake.requests[-1].body
    assert final.prompt_tokens == prompt_tokens_for(body["messages"])
    assert sum(o.num_tokens for o in outputs) == len(expected)
    assert engine.active_requests() == 0


async def test_multi_token_chunks_are_corrected_by_upstream_usage(engine, fake):
    fake.configure(reply_tokens=9, tokens_per_chunk=4)  # 3 chunks, 9 tokens
    outputs = await collect(engine, chat())
    assert [o.num_tokens for o in outputs[:-1]] == [1, 1, 1]
    assert outputs[-1].num_tokens == 6
    assert sum(o.num_tokens for o in outputs) == 9


async def test_max_tokens_reached_finishes_with_length(engine, fake):
    fake.configure(reply_tokens=20)
    outputs = await collect(engine, chat(max_tokens=5))
    assert outputs[-1].finish_reason == "length"
    assert sum(o.num_tokens for o in outputs) == 5


async def test_request_body_streams_with_usage_and_carries_sampling(engine, fake):
    await collect(engine, chat("hello", temperature=0.2, top_p=0.9, seed=7, stop=("END",),
                               max_tokens=33))
    body = fake.requests[-1].body
    assert fake.requests[-1].path == "/v1/chat/completions"
    assert body["model"] == "gpt-fake"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert (body["temperature"], body["top_p"], body["seed"], body["stop"]) == (
        0.2, 0.9, 7, ["END"])
    assert body["max_tokens"] == 33


async def test_max_tokens_omitted_without_a_default_and_capped_with_one(engine, fake):
    await collect(engine, chat())
    assert "max_tokens" not in fake.requests[-1].body
    assert "seed" not in fake.requests[-1].body and "stop" not in fake.requests[-1].body
    await collect(engine, chat(default_max_tokens=100_000))
    assert fake.requests[-1].body["max_tokens"] == 8192  # the context length


async def test_raw_prompt_becomes_one_user_message(engine, fake):
    await collect(engine, GenerationRequest(request_id="r", prompt="Once upon a time"))
    assert fake.requests[-1].body["messages"] == [{"role": "user", "content": "Once upon a time"}]


async def test_usage_missing_keeps_chunk_count_and_zero_prompt_tokens(engine, fake):
    fake.configure(send_usage=False, reply_tokens=4)
    outputs = await collect(engine, chat())
    assert sum(o.num_tokens for o in outputs) == 4
    assert outputs[-1].prompt_tokens == 0 and outputs[-1].finish_reason == "stop"


# ------------------------------------------------------------------ credentials


async def test_authorization_uses_the_key_from_the_env_var_read_per_request(
    engine, fake, monkeypatch
):
    await collect(engine, chat())
    assert fake.requests[-1].headers["Authorization"] == f"Bearer {SENTINEL_KEY}"
    monkeypatch.setenv(KEY_ENV, "sk-rotated")
    await collect(engine, chat())
    assert fake.requests[-1].api_key == "sk-rotated"


async def test_organization_header_is_sent_when_configured(fake):
    eng = OpenAITextEngine("m", make_config(fake, organization="org-123"))
    await eng.start()
    try:
        await collect(eng, chat())
    finally:
        await eng.shutdown()
    assert fake.requests[-1].headers["OpenAI-Organization"] == "org-123"


async def test_missing_key_fails_naming_the_env_var(engine, fake, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    err = await raised(engine, chat())
    assert isinstance(err, AuthenticationFailed)
    assert KEY_ENV in err.message
    assert fake.requests == []  # nothing was sent without a key
    assert engine.active_requests() == 0


async def test_upstream_401_maps_and_never_leaks_the_key(engine, fake):
    fake.configure(status=401)  # the fake echoes the full key in its message
    err = await raised(engine, chat())
    assert isinstance(err, AuthenticationFailed) and err.status == 401
    assert KEY_ENV in err.message
    assert SENTINEL_KEY not in repr((err.message, err.details, str(err)))
    assert err.details["upstream_status"] == 401


# ------------------------------------------------------------------ upstream errors


async def test_context_length_exceeded_maps_by_error_code(engine, fake):
    fake.configure(status=400)
    err = await raised(engine, chat())
    assert type(err) is ContextLengthExceeded
    assert err.details["upstream_error"]["code"] == "context_length_exceeded"
    assert err.param == "messages"


async def test_other_400_is_invalid_request_with_the_provider_body(engine, fake):
    fake.configure(status=400, error_code="invalid_value", error_message="temperature is bad")
    err = await raised(engine, chat())
    assert type(err) is InvalidRequest
    assert err.details["upstream_error"]["message"] == "temperature is bad"
    assert "temperature is bad" in err.message


@pytest.mark.parametrize(
    "status, cls",
    [(403, AuthorizationFailed), (404, InvalidRequest), (500, InferenceFailed),
     (503, InferenceFailed)],
)
async def test_status_mapping(engine, fake, status, cls):
    fake.configure(status=status)
    err = await raised(engine, chat())
    assert type(err) is cls
    assert err.details["upstream_status"] == status


async def test_429_carries_retry_after(engine, fake):
    fake.configure(status=429, retry_after="7")
    err = await raised(engine, chat())
    assert isinstance(err, RateLimitExceeded)
    assert err.retry_after_s == 7 and err.headers() == {"Retry-After": "7"}


async def test_error_event_mid_stream_raises_inference_failed(engine, fake):
    fake.configure(reply_tokens=6, error_after_chunks=2)
    seen: list[str] = []
    with pytest.raises(InferenceFailed):
        async for out in engine.generate(chat()):
            seen.append(out.text)
    assert len(seen) == 2
    assert engine.active_requests() == 0


async def test_connection_dropped_mid_stream_is_inference_failed(engine, fake):
    fake.configure(reply_tokens=6, disconnect_after_chunks=2, token_delay_s=0.05)
    seen: list[str] = []
    with pytest.raises(InferenceFailed):
        async for out in engine.generate(chat()):
            seen.append(out.text)
    # aiohttp drops bytes still buffered when the connection breaks, so "at most 2".
    assert seen == reply_tokens("Say something nice")[: len(seen)] and len(seen) <= 2
    assert engine.active_requests() == 0


async def test_connection_refused_is_inference_failed(fake):
    eng = OpenAITextEngine("m", make_config(fake, base_url="http://127.0.0.1:9/v1"))
    await eng.start()
    try:
        err = await raised(eng, chat())
    finally:
        await eng.shutdown()
    assert type(err) is InferenceFailed


# ------------------------------------------------------------------ timeouts


async def test_idle_timeout_names_the_phase(fake):
    fake.configure(reply_tokens=5, stall_after_chunks=2)
    eng = OpenAITextEngine("m", make_config(fake, idle_timeout_s=0.3))
    await eng.start()
    try:
        seen = []
        with pytest.raises(Timeout) as info:
            async for out in eng.generate(chat()):
                seen.append(out)
    finally:
        await eng.shutdown()
    assert info.value.details["phase"] == "idle" and len(seen) == 2
    await fake_streams(fake, 0)


@pytest.mark.parametrize("behaviour", [{"headers_delay_s": 2}, {"stall_after_chunks": 0}])
async def test_first_byte_timeout_names_the_phase(fake, behaviour):
    fake.configure(**behaviour)
    eng = OpenAITextEngine("m", make_config(fake, first_byte_timeout_s=0.3))
    await eng.start()
    try:
        started = time.monotonic()
        err = await raised(eng, chat())
    finally:
        await eng.shutdown()
    assert isinstance(err, Timeout) and err.details["phase"] == "first_byte"
    assert time.monotonic() - started < 1.5


async def test_total_timeout_names_the_phase(fake):
    fake.configure(reply_tokens=50, token_delay_s=0.05)
    eng = OpenAITextEngine("m", make_config(fake, total_timeout_s=0.4))
    await eng.start()
    try:
        err = await raised(eng, chat())
    finally:
        await eng.shutdown()
    assert isinstance(err, Timeout) and err.details["phase"] == "total"


# ------------------------------------------------------------------ cancellation


async def fake_streams(fake: FakeOpenAI, count: int, timeout: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while fake.open_streams != count:
        assert time.monotonic() < deadline, f"fake has {fake.open_streams} open streams"
        await asyncio.sleep(0.01)


async def test_closing_the_generator_closes_the_upstream_stream(engine, fake):
    fake.configure(reply_tokens=200, token_delay_s=0.02)
    stream = engine.generate(chat())
    first = await stream.__anext__()
    assert first.text and engine.active_requests() == 1
    assert fake.open_streams == 1
    await stream.aclose()
    assert engine.active_requests() == 0
    await fake_streams(fake, 0)
    assert fake.streams_closed_by_client == 1


async def test_cancelling_the_consumer_task_closes_the_upstream_stream(engine, fake):
    fake.configure(reply_tokens=3, stall_after_chunks=1)
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in engine.generate(chat()):
            got_one.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.active_requests() == 0
    await fake_streams(fake, 0)


async def test_abort_by_request_id_ends_with_abort_and_closes_upstream(engine, fake):
    fake.configure(reply_tokens=3, stall_after_chunks=1)
    outputs = []
    async for out in engine.generate(chat(request_id="to-abort")):
        outputs.append(out)
        if len(outputs) == 1:
            assert engine.active_requests() == 1
            await engine.abort("to-abort")
    assert outputs[-1].finish_reason == "abort"
    assert engine.active_requests() == 0
    await fake_streams(fake, 0)
    await engine.abort("to-abort")  # already finished: a no-op


async def test_abort_while_waiting_for_headers(engine, fake):
    fake.configure(headers_delay_s=2)
    stream = engine.generate(chat(request_id="early"))
    pending = asyncio.create_task(stream.__anext__())
    deadline = time.monotonic() + 1
    while not fake.requests:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    await engine.abort("early")
    out = await asyncio.wait_for(pending, 1)
    assert out.finish_reason == "abort"
    await stream.aclose()
    assert engine.active_requests() == 0


# ------------------------------------------------------------------ wiring and parsing


def test_registry_builds_the_engine(fake):
    engine = create_text_engine("m", make_config(fake))
    assert isinstance(engine, OpenAITextEngine) and isinstance(engine, TextEngine)
    assert engine.context_length == 8192


async def test_fake_answers_non_streaming_requests_too(fake):
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async with session.post(fake.url + "/chat/completions", json={
            "model": "x", "messages": [{"role": "user", "content": "hi"}]}) as resp:
            body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "".join(reply_tokens("hi"))
    assert body["usage"]["completion_tokens"] == len(reply_tokens("hi"))


def test_sse_parser_handles_split_lines_crlf_comments_and_multiline_data():
    parser = SSEParser()
    stream = [b": keep-alive\r\n\r\ndata: {\"a\"", b": 1}\r", b"\n\r\ndata: x\ndata:y\n",
              b"\ndata: \xc3", b"\xa9\n\n", b"event: ping\n\n", b"data: [DONE]"]
    events = [e for chunk in stream for e in parser.feed(chunk)]
    events += list(parser.close())
    assert events == ['{"a": 1}', "x\ny", "é", "[DONE]"]

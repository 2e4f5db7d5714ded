"""SSE keepalive comments (``gateway.sse_keepalive_s``) on every streaming route."""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest

from serve_app.settings import load_settings
from serve_app.http.sse import KEEPALIVE
from tests.unit.gateway_fakes import GatewayUnderTest, sse_events

MSG = [{"role": "user", "content": "Tell me about actors"}]

# Each route with a body asking the "pausing" model for 3 tokens.
STREAMS = {
    "chat": ("/v1/chat/completions", {"messages": MSG, "max_tokens": 3, "stream": True}),
    "completions": ("/v1/completions", {"prompt": "Once", "max_tokens": 3, "stream": True}),
    "native": ("/inference/stream", {"prompt": "Once", "max_tokens": 3}),
    "responses": ("/v1/responses", {"input": "Hi", "max_output_tokens": 3, "stream": True}),
    "messages": ("/v1/messages", {"messages": MSG, "max_tokens": 3, "stream": True}),
}


async def gateway(keepalive_s: Any) -> GatewayUnderTest:
    return GatewayUnderTest(load_settings({
        "models": [
            # Silent for 150 ms before each token: longer than the keepalive interval.
            {"id": "pausing", "engine": {"type": "mock", "token_delay_ms": 150,
                                         "first_token_delay_ms": 0, "ignore_eos": True}},
            {"id": "fast", "engine": {"type": "mock", "token_delay_ms": 0, "ignore_eos": True}},
        ],
        "gateway": {"sse_keepalive_s": keepalive_s},
    }))


@pytest.fixture
async def keepalive_gw() -> AsyncIterator[GatewayUnderTest]:
    gw = await gateway(0.05)
    try:
        yield gw
    finally:
        await gw.client.aclose()


def raw_blocks(text: str) -> list[str]:
    return [b for b in text.split("\n\n") if b]


@pytest.mark.parametrize("route", list(STREAMS))
async def test_a_silent_model_gets_keepalive_comments_between_events(
    keepalive_gw: GatewayUnderTest, route: str
) -> None:
    path, body = STREAMS[route]
    r = await keepalive_gw.post(path, json={**body, "model": "pausing"})
    assert r.status_code == 200, r.text
    blocks = raw_blocks(r.text)
    keepalives = [i for i, b in enumerate(blocks) if b + "\n\n" == KEEPALIVE.decode()]
    assert keepalives, r.text
    # They sit between events (never first: the first token came with the response),
    # and the events themselves are unchanged.
    assert keepalives[0] > 0 and keepalives[-1] < len(blocks) - 1
    events = sse_events(r)
    assert len(events) == len(blocks) - len(keepalives)  # every other block is an event
    fast = await keepalive_gw.post(path, json={**body, "model": "fast"})
    assert ": keepalive" not in fast.text  # a model that keeps talking needs none
    # Same ending either way (the stream's own final events are untouched).
    last = sse_events(fast)[-1]
    assert events[-1]["event"] == last["event"]
    assert events[-1]["data"].split('"')[:4] == last["data"].split('"')[:4]


async def test_keepalive_can_be_disabled() -> None:
    gw = await gateway(None)
    try:
        r = await gw.post("/v1/chat/completions", json={
            "model": "pausing", "messages": MSG, "max_tokens": 3, "stream": True})
        assert r.status_code == 200 and ": keepalive" not in r.text
        assert sse_events(r)[-1]["data"] == "[DONE]"
    finally:
        await gw.client.aclose()


def test_keepalive_must_be_positive() -> None:
    with pytest.raises(Exception, match="sse_keepalive_s"):
        load_settings({"models": [], "gateway": {"sse_keepalive_s": 0}})


@pytest.mark.parametrize("route", ["responses", "messages"])
async def test_official_client_decoders_skip_keepalives(
    keepalive_gw: GatewayUnderTest, route: str
) -> None:
    from anthropic._streaming import SSEDecoder as AnthropicDecoder
    from openai._streaming import SSEDecoder as OpenAIDecoder

    path, body = STREAMS[route]
    r = await keepalive_gw.post(path, json={**body, "model": "pausing"})
    assert ": keepalive" in r.text
    expected = [(e["event"], e["data"]) for e in sse_events(r)]
    for decoder in (OpenAIDecoder(), AnthropicDecoder()):
        decoded = [(e.event, e.data) for e in decoder.iter_bytes(iter([r.content]))]
        assert decoded == expected

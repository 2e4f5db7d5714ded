"""A gateway for the agent-feature tests: the usual mock models plus a vision one, larger
bodies, and the official OpenAI and Anthropic clients wired to it in process."""

from __future__ import annotations

from typing import Any, AsyncIterator

import httpx
import pytest

from serve_app.settings import load_settings
from tests.unit.gateway_fakes import MODELS, GatewayUnderTest

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "minLength": 2},
                "days": {"type": "integer", "minimum": 1},
                "unit": {"type": "string", "enum": ["c", "f"]},
            },
            "required": ["city", "days", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]}},
}
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"


def make_agent_gateway(**gateway: Any) -> GatewayUnderTest:
    models = [*MODELS, {"id": "mock-vision", "engine": {"type": "mock", "token_delay_ms": 0},
                        "vision": True}]
    return GatewayUnderTest(load_settings({
        "models": models,
        "gateway": {"max_body_bytes": 1 << 20, "health_timeout_s": 0.2, **gateway},
    }))


@pytest.fixture
async def agw() -> AsyncIterator[GatewayUnderTest]:
    gateway = make_agent_gateway()
    try:
        yield gateway
    finally:
        await gateway.client.aclose()


@pytest.fixture
async def oai(agw: GatewayUnderTest) -> AsyncIterator[Any]:
    """The official AsyncOpenAI client talking to the in-process gateway."""
    import openai

    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=agw.app))
    client = openai.AsyncOpenAI(base_url="http://troupe.test/v1", api_key="unused",
                                http_client=http, max_retries=0)
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def claude(agw: GatewayUnderTest) -> AsyncIterator[Any]:
    """The official AsyncAnthropic client talking to the in-process gateway."""
    import anthropic
    import httpx2  # the anthropic client's own fork of httpx

    http = httpx2.AsyncClient(transport=httpx2.ASGITransport(app=agw.app))
    client = anthropic.AsyncAnthropic(base_url="http://troupe.test", api_key="unused",
                                      http_client=http, max_retries=0)
    try:
        yield client
    finally:
        await client.close()

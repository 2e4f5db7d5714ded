"""The pieces behind the agent routes: the mock's schema instances, n fan-out, image checks."""

from __future__ import annotations

import asyncio
import base64

import jsonschema
import pytest
from aiohttp import web

from deployments.engines.mock_agent import minimal_instance
from serve_app.errors import InvalidRequest
from serve_app.gateway.fanout import fan_out
from serve_app.gateway.images import _fetch, check_data_url, host_allowed
from serve_app.protocol.internal import GenerationRequest, SamplingParams
from serve_app.protocol.openai_tools import check_json_schema

SCHEMAS = [
    {"type": "object", "properties": {"a": {"type": "integer", "minimum": 3}}, "required": ["a"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string",
     "minLength": 2}, "minItems": 2}, "kind": {"enum": ["x", "y"]}}, "required": ["tags", "kind"]},
    {"$defs": {"P": {"type": "object", "properties": {"n": {"type": "number"}}, "required": ["n"]}},
     "type": "object", "properties": {"p": {"$ref": "#/$defs/P"},
                                      "o": {"anyOf": [{"type": "null"}, {"type": "string"}]}},
     "required": ["p", "o"]},
    {"type": "object", "properties": {"flag": {"type": ["boolean", "null"]}}, "required": ["flag"]},
]


@pytest.mark.parametrize("schema", SCHEMAS)
def test_the_mock_answers_a_minimal_valid_instance(schema) -> None:
    jsonschema.validate(minimal_instance(schema), schema)


def test_a_schema_that_is_not_json_schema_is_named() -> None:
    with pytest.raises(ValueError, match="properties"):
        check_json_schema({"type": "object", "properties": {"a": {"type": 3}}}, "schema")


def test_fan_out_gives_distinct_ids_and_consecutive_seeds() -> None:
    request = GenerationRequest("req_1", SamplingParams(seed=2**64 - 1), prompt="x")
    copies = fan_out(request, 3)
    assert [c.request_id for c in copies] == ["req_1-0", "req_1-1", "req_1-2"]
    assert [c.sampling.seed for c in copies] == [2**64 - 1, 0, 1]
    assert fan_out(request, 1) == [request]
    assert fan_out(GenerationRequest("r", prompt="x"), 2)[1].sampling.seed is None


def test_data_urls_are_checked_for_kind_encoding_and_size() -> None:
    good = "data:image/png;base64," + base64.b64encode(b"x" * 100).decode()
    assert check_data_url(good, 1024) == good
    for bad in ("data:image/png,rawbytes", "data:text/html;base64,aGk=",
                "data:image/png;base64,***"):
        with pytest.raises(InvalidRequest):
            check_data_url(bad, 1024)
    with pytest.raises(InvalidRequest, match="limit"):
        check_data_url(good, 50)


def test_host_allow_list_matches_exact_names_and_dot_domains() -> None:
    assert host_allowed("img.example.com", [".example.com"])
    assert host_allowed("cdn.test", ["cdn.test"])
    assert not host_allowed("example.com.evil.net", [".example.com"])
    assert not host_allowed("cdn.test", [])


async def _serve(content_type: str, body: bytes) -> tuple[web.AppRunner, str]:
    async def image(_request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    app = web.Application()
    app.router.add_get("/cat.png", image)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}/cat.png"


async def test_an_allowed_url_is_fetched_and_inlined_within_the_cap() -> None:
    runner, url = await _serve("image/png", b"\x89PNG" + b"0" * 60)
    try:
        inlined = await _fetch(url, ["127.0.0.1"], 1024)
        assert inlined.startswith("data:image/png;base64,")
        assert base64.b64decode(inlined.split(",", 1)[1]).startswith(b"\x89PNG")
        with pytest.raises(InvalidRequest, match="limit"):
            await _fetch(url, ["127.0.0.1"], 10)
        with pytest.raises(InvalidRequest, match="not allowed"):
            await _fetch(url, ["other.host"], 1024)
    finally:
        await runner.cleanup()


async def test_a_url_that_is_not_an_image_is_refused() -> None:
    runner, url = await _serve("text/html", b"<html>")
    try:
        with pytest.raises(InvalidRequest, match="not an image"):
            await asyncio.wait_for(_fetch(url, ["127.0.0.1"], 1024), 10)
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("url", ["https://10.0.0.7/cat.png", "https://169.254.169.254/x.png",
                                 "http://8.8.8.8/cat.png"])
async def test_private_or_plain_http_addresses_are_refused_even_when_listed(url) -> None:
    host = url.split("/")[2]
    with pytest.raises(InvalidRequest, match="private or reserved"):
        await _fetch(url, [host], 1024)


def test_agent_fields_a_remote_adapter_would_drop_are_named() -> None:
    from serve_app.gateway.agent_checks import unsupported_field
    from serve_app.protocol.internal import ChatMessage, ResponseFormat, ToolSpec

    plain = GenerationRequest("r", messages=[ChatMessage("user", "hi")])
    assert unsupported_field(plain) is None
    assert unsupported_field(GenerationRequest("r", tools=(ToolSpec("f"),))) == "tools"
    assert unsupported_field(GenerationRequest(
        "r", response_format=ResponseFormat("json_object"))) == "response_format"
    assert unsupported_field(GenerationRequest("r", SamplingParams(logit_bias={1: 2.0}))) == "logit_bias"
    assert unsupported_field(GenerationRequest("r", prompt_token_ids=(1,))) == "prompt"
    tool_turn = GenerationRequest("r", messages=[ChatMessage("tool", "3", tool_call_id="c")])
    assert unsupported_field(tool_turn, "input") == "input"

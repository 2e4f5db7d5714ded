"""Bad input to the gateway: every case is a 4xx in the route family's envelope."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Optional
import pytest

from tests.unit.gateway_fakes import (
    GatewayUnderTest,
    MAX_BODY,
    assert_native_error,
    assert_openai_error,
    chat_body,
)


# ------------------------------------------------------------------ bad inputs


BAD_CHAT_BODIES: list[tuple[str, Any, Optional[str]]] = [
    # (case, raw body bytes or a JSON value, the param the error should name)
    ("empty body", b"", None),
    ("whitespace body", b"   \n", None),
    ("invalid json", b'{"model": "mock-fast", "messages": [', None),
    ("json array body", b'[{"model": "mock-fast"}]', None),
    ("json string body", b'"hello"', None),
    ("NaN literal", b'{"model": "mock-fast", "messages": [{"role": "user", "content": "x"}], '
                    b'"temperature": NaN}', None),
    ("missing messages", {"model": "mock-fast"}, "messages"),
    ("messages empty", {"model": "mock-fast", "messages": []}, "messages"),
    ("messages not a list", {"model": "mock-fast", "messages": "hello"}, "messages"),
    ("bad role", {"model": "mock-fast", "messages": [{"role": "robot", "content": "x"}]},
     "messages.0.role"),
    ("model not a string", {**chat_body(), "model": 123}, "model"),
    ("max_tokens a string", {**chat_body(), "max_tokens": "ten"}, "max_tokens"),
    ("temperature a string", {**chat_body(), "temperature": "hot"}, "temperature"),
    ("stream an object", {**chat_body(), "stream": {"on": True}}, "stream"),
    ("image for a text-only model",
     {"model": "mock-fast", "messages": [{"role": "user", "content": [
         {"type": "image_url", "image_url": {"url": "http://x/cat.png"}}]}]},
     "messages"),
    ("n=0", {**chat_body(), "n": 0}, "n"),
    ("max_tokens=0", {**chat_body(), "max_tokens": 0}, "max_tokens"),
    ("max_tokens negative", {**chat_body(), "max_tokens": -5}, "max_tokens"),
    ("temperature=5", {**chat_body(), "temperature": 5}, "temperature"),
    ("top_p=0", {**chat_body(), "top_p": 0}, "top_p"),
    ("5 stop strings", {**chat_body(), "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("empty stop string", {**chat_body(), "stop": ""}, "stop"),
    ("prompt_cache_key a number", {**chat_body(), "prompt_cache_key": 7}, "prompt_cache_key"),
]


@pytest.mark.parametrize(
    ("body", "param"),
    [pytest.param(body, param, id=case) for case, body, param in BAD_CHAT_BODIES],
)
async def test_bad_chat_input_is_400_in_the_openai_envelope(gw: GatewayUnderTest, body: Any, param) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = await gw.post(
        "/v1/chat/completions", headers={"content-type": "application/json"}, **kwargs
    )
    err = assert_openai_error(response, 400, "invalid_request")
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err
    # Every message shows the client a valid example to copy.
    if param is None:
        assert '"messages"' in err["message"]


NATIVE_BAD_BODIES: list[tuple[str, Any]] = [
    ("empty body", b""),
    ("invalid json", b"{not json"),
    ("json array body", b"[]"),
    ("NaN literal", b'{"model": "mock-fast", "prompt": "x", "temperature": NaN}'),
    ("prompt and messages", {"model": "mock-fast", "prompt": "x",
                             "messages": [{"role": "user", "content": "y"}]}),
    ("neither prompt nor messages", {"model": "mock-fast"}),
    ("max_tokens=0", {"model": "mock-fast", "prompt": "x", "max_tokens": 0}),
    ("temperature=5", {"model": "mock-fast", "prompt": "x", "temperature": 5}),
    ("5 stop strings", {"model": "mock-fast", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}),
    ("image content part", {"model": "mock-fast", "messages": [
        {"role": "user", "content": [{"type": "input_audio"}]}]}),
]


@pytest.mark.parametrize("path", ["/inference", "/inference/stream"])
@pytest.mark.parametrize(
    "body", [pytest.param(body, id=case) for case, body in NATIVE_BAD_BODIES]
)
async def test_bad_native_input_is_400_in_the_native_envelope(gw: GatewayUnderTest, path: str, body: Any) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = await gw.post(path, headers={"content-type": "application/json"}, **kwargs)
    assert_native_error(response, 400, "INVALID_REQUEST")


async def test_native_unknown_model_is_404(gw: GatewayUnderTest) -> None:
    response = await gw.post("/inference", json={"model": "nope", "prompt": "x"})
    body = assert_native_error(response, 404, "MODEL_NOT_FOUND")
    assert body["error"]["details"]["model"] == "nope"
    assert "mock-fast" in body["error"]["details"]["available"]


async def test_context_length_exceeded_is_400_with_its_own_code(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/v1/chat/completions", json=chat_body("too long", max_tokens=100_000)
    )
    err = assert_openai_error(response, 400, "context_length_exceeded")
    assert err["param"] == "max_tokens"


async def test_context_length_exceeded_on_a_stream_is_a_400_not_a_200(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/v1/chat/completions", json=chat_body("too long", max_tokens=100_000, stream=True)
    )
    assert_openai_error(response, 400, "context_length_exceeded")


async def test_unknown_route_is_404_in_the_native_envelope(gw: GatewayUnderTest) -> None:
    response = await gw.get("/no/such/route")
    body = assert_native_error(response, 404, "NOT_FOUND")
    assert "/no/such/route" in body["error"]["message"]


async def test_unknown_v1_route_is_404_in_the_openai_envelope(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/no-such-route")
    assert_openai_error(response, 404, "not_found")


async def test_wrong_method_is_405(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/chat/completions")
    assert_openai_error(response, 405, "method_not_allowed")
    native = await gw.get("/inference")
    assert_native_error(native, 405, "METHOD_NOT_ALLOWED")


async def test_405_says_which_methods_are_allowed(gw: GatewayUnderTest) -> None:
    response = await gw.get("/inference")
    assert response.status_code == 405
    assert "POST" in (response.json()["error"]["details"]["allow"] or "")
    assert "POST" in response.headers.get("allow", "")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/inference"])
async def test_body_over_the_limit_is_413(gw: GatewayUnderTest, path: str) -> None:
    body = chat_body("x" * (MAX_BODY + 100))
    if path == "/inference":
        body = {"model": "mock-fast", "prompt": "x" * (MAX_BODY + 100)}
    response = await gw.post(path, json=body)
    assert response.status_code == 413
    code = response.json()["error"]["code"]
    assert code == ("request_too_large" if path.startswith("/v1") else "REQUEST_TOO_LARGE")


async def test_chunked_body_over_the_limit_is_413(gw: GatewayUnderTest) -> None:
    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the size is counted
        for _ in range(4):
            yield b" " * 1000
        yield json.dumps(chat_body()).encode()

    response = await gw.post(
        "/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_openai_error(response, 413, "request_too_large")


async def test_body_just_under_the_limit_is_served(gw: GatewayUnderTest) -> None:
    body = chat_body("", max_tokens=2)
    body["messages"][0]["content"] = "x" * (MAX_BODY - len(json.dumps(body)) - 10)
    response = await gw.post("/v1/chat/completions", json=body)
    assert len(response.request.content) < MAX_BODY
    assert response.status_code == 200


"""The gateway's OpenAI routes over in-process HTTP with fake model handles (see gateway_fakes):
models, chat, completions, request identity, unknown fields."""

from __future__ import annotations


from tests.unit.gateway_fakes import (
    GatewayUnderTest,
    MODELS,
    assert_openai_error,
    chat_body,
    sse_json,
)


# ------------------------------------------------------------------------ models


async def test_list_models(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [m["id"] for m in MODELS]
    assert all(m["object"] == "model" and m["owned_by"] == "troupe" for m in body["data"])


async def test_get_one_model(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/models/mock-fast")
    assert response.status_code == 200
    assert response.json()["id"] == "mock-fast"


async def test_get_unknown_model_is_a_404_envelope(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/models/gpt-nope")
    err = assert_openai_error(response, 404, "model_not_found")
    assert err["type"] == "not_found_error"
    assert err["param"] == "model"
    assert "mock-fast" in err["message"]  # says which models exist


async def test_chat_with_unknown_model_is_404(gw: GatewayUnderTest) -> None:
    response = await gw.post("/v1/chat/completions", json={**chat_body(), "model": "nope"})
    assert_openai_error(response, 404, "model_not_found")


# -------------------------------------------------------------------------- chat


async def test_chat_completion(gw: GatewayUnderTest) -> None:
    response = await gw.post("/v1/chat/completions", json=chat_body(max_tokens=20))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == "mock-fast"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 < usage["completion_tokens"] <= 20
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_chat_max_completion_tokens_wins_over_max_tokens(gw: GatewayUnderTest) -> None:
    body = {**chat_body(), "model": "mock-slow", "max_tokens": 9, "max_completion_tokens": 3}
    response = await gw.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 3


async def test_chat_stream(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/v1/chat/completions",
        json=chat_body(max_tokens=20, stream=True, stream_options={"include_usage": True}),
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    chunks, raw = sse_json(response)

    assert raw[-1] == "[DONE]"
    assert raw.count("[DONE]") == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    *content, finish, usage_chunk = chunks
    content = content[1:]
    # The last text rides with the finish reason (as vLLM does); earlier chunks have none.
    assert all(c["choices"][0]["finish_reason"] is None for c in content)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert finish["choices"][0]["finish_reason"] in ("stop", "length")
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in content + [finish])
    assert text, "the stream carried text"
    assert usage_chunk["choices"] == []
    usage = usage_chunk["usage"]
    assert 0 < usage["completion_tokens"] <= 20
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


async def test_chat_stream_without_include_usage_has_no_usage(gw: GatewayUnderTest) -> None:
    response = await gw.post("/v1/chat/completions", json=chat_body(max_tokens=5, stream=True))
    chunks, raw = sse_json(response)
    assert raw[-1] == "[DONE]"
    assert all("usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


async def test_stream_text_equals_non_stream_text_at_temperature_zero(gw: GatewayUnderTest) -> None:
    body = chat_body("Describe the weather", max_tokens=30, temperature=0)
    plain = (await gw.post("/v1/chat/completions", json=body)).json()
    streamed = await gw.post("/v1/chat/completions", json={**body, "stream": True})
    chunks, _ = sse_json(streamed)

    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


async def test_same_seed_gives_same_answer(gw: GatewayUnderTest) -> None:
    body = chat_body("Pick a word", max_tokens=10, temperature=1.0, seed=42)
    a = (await gw.post("/v1/chat/completions", json=body)).json()
    b = (await gw.post("/v1/chat/completions", json=body)).json()
    c = (await gw.post("/v1/chat/completions", json={**body, "seed": 43})).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    assert a["choices"][0]["message"] != c["choices"][0]["message"]


async def test_chat_with_text_content_parts(gw: GatewayUnderTest) -> None:
    parts = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    body = {"model": "mock-fast", "messages": [{"role": "user", "content": parts}], "max_tokens": 5}
    response = await gw.post("/v1/chat/completions", json=body)
    assert response.status_code == 200


async def test_stop_string_trims_the_answer(gw: GatewayUnderTest) -> None:
    body = chat_body("Say things", max_tokens=30, temperature=0)
    full = (await gw.post("/v1/chat/completions", json=body)).json()
    text = full["choices"][0]["message"]["content"]
    stop = text.split()[2]
    response = await gw.post("/v1/chat/completions", json={**body, "stop": [stop]})
    trimmed = response.json()["choices"][0]
    assert trimmed["message"]["content"] == text[: text.find(stop)]
    assert trimmed["finish_reason"] == "stop"


# -------------------------------------------------------------------- completions


async def test_completion(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/v1/completions", json={"model": "mock-fast", "prompt": "Once upon", "max_tokens": 10}
    )
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-")
    assert body["choices"][0]["text"]
    assert body["choices"][0]["finish_reason"] in ("stop", "length")
    assert 0 < body["usage"]["completion_tokens"] <= 10


async def test_completion_echo_and_single_item_prompt_list(gw: GatewayUnderTest) -> None:
    body = {"model": "mock-fast", "prompt": ["Once upon"], "max_tokens": 5, "temperature": 0}
    plain = (await gw.post("/v1/completions", json=body)).json()
    echoed = (await gw.post("/v1/completions", json={**body, "echo": True})).json()
    assert echoed["choices"][0]["text"] == "Once upon" + plain["choices"][0]["text"]


async def test_completion_stream_matches_non_stream(gw: GatewayUnderTest) -> None:
    body = {"model": "mock-fast", "prompt": "Once upon", "max_tokens": 12, "temperature": 0}
    plain = (await gw.post("/v1/completions", json=body)).json()
    response = await gw.post(
        "/v1/completions",
        json={**body, "stream": True, "stream_options": {"include_usage": True}},
    )
    assert response.status_code == 200
    chunks, raw = sse_json(response)

    assert raw[-1] == "[DONE]"
    assert all(c["object"] == "text_completion" for c in chunks)
    *text_chunks, usage_chunk = chunks
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == plain["choices"][0]["text"]
    assert text_chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == plain["usage"]


async def test_completion_with_several_prompts_has_a_choice_per_prompt(gw: GatewayUnderTest) -> None:
    response = await gw.post("/v1/completions", json={"model": "mock-fast", "prompt": ["a", "b"]})
    assert response.status_code == 200
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1] and all(c["text"] for c in choices)


# ------------------------------------------------------------ request identity


async def test_every_response_carries_a_request_id(gw: GatewayUnderTest) -> None:
    responses = [
        await gw.get("/v1/models"),
        await gw.get("/health"),
        await gw.post("/v1/chat/completions", json=chat_body(max_tokens=2)),
        await gw.post("/v1/chat/completions", json=chat_body(max_tokens=2, stream=True)),
        await gw.post("/v1/chat/completions", content=b"{"),
        await gw.get("/nowhere"),
        await gw.request("DELETE", "/v1/models"),
        await gw.post("/inference", json={"model": "nope", "prompt": "x"}),
    ]
    ids = [r.headers.get("x-request-id") for r in responses]
    assert all(i and i.startswith("req_") for i in ids), ids
    assert len(set(ids)) == len(ids)


async def test_client_request_id_is_echoed_but_not_used_as_ours(gw: GatewayUnderTest) -> None:
    response = await gw.post(
        "/v1/chat/completions",
        json=chat_body(max_tokens=2),
        headers={"X-Client-Request-Id": "my-trace-123"},
    )
    assert response.headers["x-client-request-id"] == "my-trace-123"
    assert response.headers["x-request-id"] != "my-trace-123"
    error = await gw.get("/v1/models/nope", headers={"X-Client-Request-Id": "my-trace-456"})
    assert error.headers["x-client-request-id"] == "my-trace-456"


async def test_a_client_sent_x_request_id_does_not_remove_ours(gw: GatewayUnderTest) -> None:
    response = await gw.get("/v1/models/nope", headers={"x-request-id": "chosen-by-client"})
    assert response.status_code == 404
    assert response.headers.get("x-request-id", "").startswith("req_")
    assert response.json()["error"]["request_id"] == response.headers["x-request-id"]


async def test_native_inference_ids_match_the_header(gw: GatewayUnderTest) -> None:
    response = await gw.post("/inference", json={"model": "mock-fast", "prompt": "hi", "max_tokens": 4})
    assert response.status_code == 200
    body = response.json()
    assert body["request_id"] == body["id"] == response.headers["x-request-id"]
    assert body["text"]
    assert body["finish_reason"] in ("stop", "length")
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]


# ---------------------------------------------------------------- unknown fields


async def test_unknown_request_fields_are_accepted(gw: GatewayUnderTest, caplog) -> None:
    caplog.set_level("INFO", logger="troupe.gateway")
    body = chat_body(max_tokens=3, frequency_penalty=0.5, brand_new_field={"x": 1})
    body["messages"][0]["some_future_field"] = True
    response = await gw.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert "brand_new_field" in caplog.text
    native = await gw.post(
        "/inference", json={"model": "mock-fast", "prompt": "x", "max_tokens": 2, "extra_knob": 1}
    )
    assert native.status_code == 200

"""The Gemini caller-shape adapter (tests/gemini_shape.py) against the in-process gateway's
mock models, every cell streamed and unary: what the matrices rely on, without Ray."""

from __future__ import annotations

import json
from typing import Iterator

import jsonschema
import pytest
from starlette.testclient import TestClient

from tests.gemini_shape import PARAMS, SCHEMA, GeminiShape, ShapeError
from tests.unit.agent_fakes import make_agent_gateway

STREAM = pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])


@pytest.fixture(scope="module")
def shape() -> Iterator[GeminiShape]:
    with TestClient(make_agent_gateway().app, base_url="http://troupe.test") as http:
        yield GeminiShape("http://troupe.test", http_client=http)


@STREAM
def test_text_and_json(shape: GeminiShape, stream: bool) -> None:
    assert len(shape.text("mock-fast", stream, max_tokens=5).split()) == 5
    jsonschema.validate(shape.json("mock-fast", stream), SCHEMA)


@STREAM
def test_forced_tool_round_trip(shape: GeminiShape, stream: bool) -> None:
    call, final = shape.tool_round_trip("mock-fast", stream, forced=True)
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    jsonschema.validate(json.loads(call["arguments"]), PARAMS)
    assert final


@STREAM
def test_image_cells(shape: GeminiShape, stream: bool) -> None:
    assert shape.image("mock-vision", stream, max_tokens=4)
    with pytest.raises(ShapeError) as info:
        shape.image("mock-fast", stream)
    assert (info.value.status, info.value.field) == (400, "contents")

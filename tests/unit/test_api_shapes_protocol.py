"""The Responses and Anthropic wire modules: pure (reusable by a remote engine) and correct."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from serve_app.protocol.anthropic import (
    MessagesRequest,
    MessageStreamEncoder,
    message_object,
    stop_reason_of,
)
from serve_app.protocol.anthropic_tools import internal_messages
from serve_app.protocol.responses import ResponsesRequest, ResponseStreamEncoder, status_of
from serve_app.protocol.responses_tools import internal_messages as responses_messages

MODULES = [
    "serve_app.protocol.responses",
    "serve_app.protocol.anthropic",
    "serve_app.routes.responses_api",
    "serve_app.routes.anthropic_api",
    "serve_app.routes.text_common",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_exports_what_all_says(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__ and all(hasattr(module, n) for n in module.__all__)


def test_wire_modules_import_no_gateway_ray_or_web_framework() -> None:
    code = (
        "import sys\n"
        "import serve_app.protocol.responses, serve_app.protocol.anthropic\n"
        "bad = [m for m in ('ray', 'torch', 'fastapi', 'starlette', 'serve_app.gateway.core',\n"
        "                   'serve_app.errors', 'serve_app.http.plumbing') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_anthropic_turns_merge_consecutive_roles_and_put_system_first() -> None:
    req = MessagesRequest.model_validate({
        "model": "m", "max_tokens": 5,
        "system": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        "messages": [
            {"role": "user", "content": "1"},
            {"role": "user", "content": [{"type": "text", "text": "2"}]},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "4"},
        ],
    })
    turns = internal_messages(req.system_text(), req.messages)
    assert [(t.role, t.content) for t in turns] == [
        ("system", "a\nb"), ("user", "1\n\n2"), ("assistant", "3"), ("user", "4")]


@pytest.mark.parametrize(
    ("finish", "stop", "reason"),
    [("length", None, "max_tokens"), ("stop", None, "end_turn"), ("stop", "###", "stop_sequence")],
)
def test_stop_reasons(finish: str, stop, reason: str) -> None:
    assert stop_reason_of(finish, stop) == reason


def test_message_stream_encoder_frames_valid_json() -> None:
    enc = MessageStreamEncoder("msg_1", "m")
    events = [*enc.start(3), enc.delta('say "hi"\n'), *enc.finish("end_turn", None, 3, 2)]
    payloads = [json.loads(data) for _, data in events]
    assert [p["type"] for p in payloads] == [name for name, _ in events]
    assert payloads[3]["delta"]["text"] == 'say "hi"\n'
    assert payloads[-2]["usage"] == {"input_tokens": 3, "output_tokens": 2}
    assert message_object("msg_1", "m", "", "end_turn", None, 1, 0)["content"] == [
        {"type": "text", "text": ""}]


def test_responses_encoder_numbers_every_event() -> None:
    body = ResponsesRequest.model_validate({"model": "m", "input": "hi"})
    enc = ResponseStreamEncoder("resp_1", 0, body)
    events = [*enc.start(), enc.delta("a"), enc.delta('"b"'), *enc.finish('a"b"', "stop", 1, 2)]
    payloads = [json.loads(data) for _, data in events]
    assert [p["sequence_number"] for p in payloads] == list(range(len(events)))
    assert payloads[-1]["response"]["usage"]["total_tokens"] == 3
    assert payloads[-1]["response"]["output"][0]["content"][0]["text"] == 'a"b"'
    assert [status_of(f) for f in ("stop", "length", "cancelled")] == [
        "completed", "incomplete", "failed"]


def test_responses_turns_put_instructions_first_and_serve_developer_as_system() -> None:
    body = ResponsesRequest.model_validate({
        "model": "m", "instructions": "I",
        "input": [{"role": "developer", "content": "D"},
                  {"role": "user", "content": [{"type": "input_text", "text": "U"}]}],
    })
    turns = responses_messages(body.instructions, body.input)
    assert [(t.role, t.content) for t in turns] == [("system", "I"), ("system", "D"), ("user", "U")]

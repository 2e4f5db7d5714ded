"""WebSocket /ws for agents (issue 15): tool-call fragments, the whole calls on complete,
logprobs on tokens, and bad agent fields answered as an error for that id."""

from __future__ import annotations

import json
from typing import Any

from starlette.testclient import TestClient

from tests.unit.agent_fakes import WEATHER, make_agent_gateway


def _run(message: dict[str, Any]) -> list[dict[str, Any]]:
    """Send one inference message; the messages for its id up to the terminal one."""
    gateway = make_agent_gateway()
    with TestClient(gateway.app) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "inference", "id": "r1", "model": "mock-fast", **message})
        out = []
        while True:
            reply = ws.receive_json()
            out.append(reply)
            if reply["type"] in ("complete", "error"):
                return out


def test_ws_streams_tool_call_fragments_and_completes_with_the_calls() -> None:
    replies = _run({"messages": [{"role": "user", "content": "weather?"}], "tools": [WEATHER],
                    "tool_choice": "required"})
    fragments = [r for r in replies if r["type"] == "tool_call"]
    complete = replies[-1]
    assert complete["type"] == "complete" and complete["finish_reason"] == "tool_calls"
    (call,) = complete["tool_calls"]
    assert fragments[0]["name"] == call["name"] == "get_weather"
    assert "".join(f["arguments"] for f in fragments) == call["arguments"]
    assert json.loads(call["arguments"])["unit"] == "c"


def test_ws_tokens_carry_logprobs() -> None:
    replies = _run({"prompt": "x", "max_tokens": 3, "logprobs": True, "top_logprobs": 2})
    tokens = [r for r in replies if r["type"] == "token"]
    assert sum(len(t["logprobs"]) for t in tokens) == 3
    assert all(len(lp["top"]) == 2 for t in tokens for lp in t["logprobs"])


def test_ws_bad_agent_field_is_an_error_for_that_id() -> None:
    (reply,) = _run({"prompt": "x", "tool_choice": "required"})
    assert reply["type"] == "error" and reply["id"] == "r1"
    assert "tool_choice" in reply["error"]["message"]

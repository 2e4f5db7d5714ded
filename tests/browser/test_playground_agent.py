"""The playground's tools and JSON-output panel in headless Chromium against the test app.

The mock engine answers tool calls deterministically (``deployments/engines/mock_agent``):
with ``tool_choice`` required it calls the tool with a minimal instance of its schema, and
after a tool result (auto) it answers in text; with a JSON schema it answers a minimal
instance of the schema.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.test_playground import DESKTOP, _open, browser  # noqa: F401  (module fixture)

pytestmark = pytest.mark.browser


@pytest.fixture()
def page(browser: Any, base_url: str) -> Iterator[Any]:  # noqa: F811  (the imported fixture)
    page = _open(browser, base_url, DESKTOP)
    # Record every WebSocket frame the page sends, to check the request it built.
    page.evaluate("""() => { window.__sent = []; const orig = WebSocket.prototype.send;
        WebSocket.prototype.send = function (d) { window.__sent.push(d); return orig.call(this, d); }; }""")
    yield page
    page.context.close()


def _sent(page: Any) -> list[dict]:
    frames = [json.loads(f) for f in page.evaluate("window.__sent")]
    return [f for f in frames if f.get("type") == "inference"]


def _ask(page: Any, text: str) -> Any:
    before = page.locator(".msg.assistant").count()
    page.select_option("#model", "mock-5ms")
    page.fill("#max-tokens", "32")
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    reply = page.locator(".msg.assistant").nth(before)
    reply.locator(".stats").wait_for()
    return reply


def test_a_required_tool_call_round_trip(page: Any) -> None:
    page.click("#agent-panel summary")
    page.check("#tools-on")
    page.click("#tool-preset")
    schema = json.loads(page.input_value("#tool-params"))
    schema["properties"]["days"] = {"type": "integer", "minimum": 3}
    schema["required"] = ["city", "days"]
    page.fill("#tool-params", json.dumps(schema))
    page.select_option("#tool-choice", "required")
    reply = _ask(page, "What is the weather like?")
    assert reply.locator(".call-name").inner_text() == "get_weather"
    assert json.loads(reply.locator(".call-args").inner_text()) == {"city": "", "days": 3}
    assert "finish tool_calls" in reply.locator(".stats").inner_text()
    [first] = _sent(page)
    assert first["tool_choice"] == "required"
    assert first["tools"][0]["function"]["parameters"] == schema
    # Answer the call: a `tool` message with its id goes back, and the final answer is text.
    reply.locator(".tool-result").fill('{"temperature_c": 21}')
    reply.locator(".send-result").click()
    final = page.locator(".msg.assistant").nth(1)
    final.locator(".stats").wait_for()
    assert final.locator(".text").inner_text().strip()
    assert final.locator(".tool-call").count() == 0
    assert "finish tool_calls" not in final.locator(".stats").inner_text()
    second = _sent(page)[1]
    assert second["tool_choice"] == "auto"
    call_turn, tool_turn = second["messages"][-2:]
    call_id = call_turn["tool_calls"][0]["id"]
    assert call_turn["role"] == "assistant" and call_turn["tool_calls"][0]["function"]["name"] == "get_weather"
    assert tool_turn == {"role": "tool", "tool_call_id": call_id, "content": '{"temperature_c": 21}'}
    page.screenshot(path=str(_shot("playground-tools.png")))


def test_a_json_schema_answer_is_shown_parsed(page: Any) -> None:
    page.click("#agent-panel summary")
    page.check("#json-on")
    schema = {"type": "object", "properties": {"title": {"type": "string"}, "year": {"type": "integer",
              "minimum": 1999}}, "required": ["title", "year"]}
    page.fill("#json-schema", json.dumps(schema))
    reply = _ask(page, "Name a film.")
    shown = reply.locator(".text").inner_text()
    assert json.loads(shown) == {"title": "", "year": 1999}
    assert "\n" in shown  # pretty-printed
    assert "parsed" in reply.locator(".note.json-ok").inner_text()
    [sent] = _sent(page)
    assert sent["response_format"]["json_schema"]["schema"] == schema


def test_a_schema_that_does_not_parse_is_named_and_nothing_is_sent(page: Any) -> None:
    page.click("#agent-panel summary")
    page.check("#json-on")
    page.fill("#json-schema", "{not json")
    page.fill("#prompt", "hi")
    page.press("#prompt", "Enter")
    assert "JSON output schema is not valid JSON" in page.locator("#agent-problem").inner_text()
    assert page.input_value("#prompt") == "hi" and _sent(page) == []


def _shot(name: str) -> Any:
    from tests.browser.test_playground import DOCS
    return DOCS / name

"""The playground at ``/`` in a real headless Chromium against a real Serve app.

Chromium is Debian's (``/usr/bin/chromium``), driven by Playwright's Python API; no
browser is downloaded. Without it the module is skipped, or fails when ``CI`` is set.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.mock_app import engine_active

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# Screenshots go to test-artifacts/ (ignored by git); TROUPE_UPDATE_SCREENSHOTS=1 writes
# the ones committed under docs/ and shown in the README instead.
_ROOT = Path(__file__).resolve().parents[2]
DOCS = _ROOT / ("docs" if os.environ.get("TROUPE_UPDATE_SCREENSHOTS") else "test-artifacts")
DOCS.mkdir(exist_ok=True)
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
MODEL_IDS = ["mock-5ms", "mock-slow", "mock-fail", "mock-small-ctx", "remote-gpt"]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(reason + " (required when CI is set)")
    pytest.skip(reason)


@contextmanager
def chromium(extra_args: tuple[str, ...] = ()) -> Iterator[Any]:
    """Debian's Chromium under Playwright, with a fresh temporary profile per launch."""
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} is missing: apt-get install -y chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright Python package is not installed")
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + list(extra_args))
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as launched:
        yield launched


def _open(browser: Any, base_url: str, viewport: dict[str, int]) -> Any:
    context = browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(base_url + "/")
    page.wait_for_selector("#model option[value='mock-5ms']", state="attached")
    page.wait_for_selector("#conn.up")
    return page


@pytest.fixture()
def desktop(browser: Any, base_url: str) -> Iterator[Any]:
    page = _open(browser, base_url, DESKTOP)
    yield page
    page.context.close()


def _send(page: Any, model: str, text: str, max_tokens: int) -> Any:
    """Send one message; returns a locator of the new assistant reply."""
    before = page.locator(".msg.assistant").count()
    page.select_option("#model", model)
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")  # Enter sends
    reply = page.locator(".msg.assistant").nth(before)
    reply.wait_for()
    return reply


def _wait_usage_row(page: Any, model: str) -> None:
    page.wait_for_function(
        """(model) => { const row = document.querySelector(`#usage-table tr[data-model="${model}"]`);
             return row && Number(row.cells[1].textContent) > 0; }""",
        arg=model, timeout=15_000)


def test_lists_models_and_streams_a_chat_with_metrics(desktop: Any) -> None:
    page = desktop
    models_text = page.inner_text("#model-groups")
    for model_id in MODEL_IDS:
        assert model_id in models_text
    # Every modality has a section with its models (the test app has a mock of each).
    for section in ["TEXT / CHAT", "SPEECH", "TRANSCRIPTION", "IMAGES"]:
        assert section in models_text.upper()
    assert "no speech model configured" not in models_text
    assert "speech-to-text" in models_text and "image-generation" in models_text
    # Record the reply's text length at every DOM mutation of the conversation.
    page.evaluate(
        """() => { window.__lens = []; new MutationObserver(() => {
             const r = document.querySelectorAll('.msg.assistant .text');
             if (r.length && !document.querySelector('.msg.assistant .stats'))
               window.__lens.push(r[r.length - 1].textContent.length);
           }).observe(document.getElementById('log'),
                      {subtree: true, childList: true, characterData: true}); }""")
    reply = _send(page, "mock-5ms", "Hello there", 64)
    reply.locator(".stats").wait_for()
    lengths = [n for n in page.evaluate("window.__lens") if n > 0]
    assert len(set(lengths)) >= 2, f"the reply did not stream incrementally: {lengths}"
    assert lengths == sorted(lengths)
    assert len(reply.locator(".text").inner_text()) >= lengths[-1] > 0
    stats = reply.locator(".stats")
    assert "ms" in stats.locator("[data-metric=ttft]").inner_text()
    assert stats.locator("[data-metric=tps]").inner_text().split()[0].replace(".", "").isdigit()
    assert "/ 64 out" in stats.locator("[data-metric=tokens]").inner_text()
    assert "$" in stats.locator("[data-metric=cost]").inner_text()
    # The Send button is reachable with Tab from the message box.
    page.focus("#prompt")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "send"


def test_stop_ends_rendering_and_the_engine_request(desktop: Any, base_url: str) -> None:
    page = desktop
    reply = _send(page, "mock-slow", "Tell me a long story", 400)
    page.wait_for_function(
        "() => { const t = document.querySelectorAll('.msg.assistant .text');"
        " return t[t.length - 1].textContent.length > 20; }")
    with httpx.Client(base_url=base_url, timeout=10) as client:
        assert engine_active(client, "mock-slow") >= 1
        page.click("#stop")
        reply.locator(".note.stopped").wait_for()
        length = len(reply.locator(".text").inner_text())
        page.wait_for_timeout(1000)  # tokens arrive every 40 ms: a second is plenty to see one
        assert len(reply.locator(".text").inner_text()) == length
        assert "(stopped)" in reply.inner_text()
        deadline = time.monotonic() + 5
        while engine_active(client, "mock-slow") != 0:
            assert time.monotonic() < deadline, "the engine kept the request after Stop"
            time.sleep(0.1)
    reply.locator("[data-metric=finish]").wait_for()
    assert "cancelled" in reply.locator("[data-metric=finish]").inner_text()


def test_a_failing_model_shows_a_clear_error(desktop: Any) -> None:
    reply = _send(desktop, "mock-fail", "Hi", 20)
    note = reply.locator(".note.error")
    note.wait_for()
    text = note.inner_text()
    assert text.startswith("Error")
    assert "INFERENCE_FAILED" in text or "failure" in text, text
    assert desktop.locator("#stop").is_disabled()


def test_usage_panel_shows_numbers_after_a_request(desktop: Any) -> None:
    reply = _send(desktop, "mock-5ms", "Count for me", 16)
    reply.locator(".stats").wait_for()
    _wait_usage_row(desktop, "mock-5ms")
    row = desktop.locator('#usage-table tr[data-model="mock-5ms"]')
    cells = row.locator("td").all_inner_texts()
    assert int(cells[1]) >= 1
    assert cells[2].endswith("ms") and cells[3].startswith("$")
    assert int(desktop.locator("#usage-totals b").first.inner_text()) >= 1
    # The chart plots traffic that arrived while the page was open: this request is a bar.
    desktop.locator("#usage-chart rect").first.wait_for()
    assert desktop.locator("#usage-chart polyline").count() == 1  # spend line
    assert "peak" in desktop.inner_text("#chart-peak")


def test_desktop_screenshot(desktop: Any) -> None:
    reply = _send(desktop, "mock-5ms", "What can this playground do?", 48)
    reply.locator(".stats").wait_for()
    _wait_usage_row(desktop, "mock-5ms")
    desktop.locator("#usage-chart rect").first.wait_for()
    DOCS.mkdir(exist_ok=True)
    desktop.screenshot(path=str(DOCS / "playground-desktop.png"))
    assert (DOCS / "playground-desktop.png").stat().st_size > 10_000


def test_phone_width_has_no_horizontal_scroll(browser: Any, base_url: str) -> None:
    page = _open(browser, base_url, PHONE)
    try:
        reply = _send(page, "mock-5ms", "Hello from a phone", 32)
        reply.locator(".stats").wait_for()
        _wait_usage_row(page, "mock-5ms")
        assert page.evaluate("document.scrollingElement.scrollWidth") <= PHONE["width"]
        DOCS.mkdir(exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(DOCS / "playground-phone.png"))
    finally:
        page.context.close()


def test_static_files_are_served_safely(base_url: str) -> None:
    with httpx.Client(base_url=base_url, timeout=10) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'src="static/app.js"' in page.text  # relative: works under a route prefix
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/static/style.css").headers["content-type"].startswith("text/css")
        head = client.head("/static/app.js")
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/javascript")
        for bad in ["/static/..%2Fapp.py", "/static/%2e%2e%2fapp.py", "/static/nope.js",
                    "/static/../routes/playground.py"]:
            assert client.get(bad).status_code == 404, bad


def test_key_rate_limit_and_dropped_socket_messages(browser: Any, base_url: str) -> None:
    """Wrong key, rate limit and a dropped socket, with a stand-in /ws and HTTP answers."""
    import json

    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(15_000)
    sockets: list[Any] = []
    seen: list[dict[str, Any]] = []

    def fake_ws(ws: Any) -> None:
        sockets.append(ws)

        def on_message(raw: Any) -> None:
            msg = json.loads(raw)
            seen.append(msg)
            if msg["type"] == "auth":
                ws.send(json.dumps({"type": "error", "error": {
                    "code": "AUTHENTICATION_FAILED", "message": "unknown key", "details": {}}}))
            elif msg["type"] == "inference" and msg["model"] == "mock-slow":
                ws.send(json.dumps({"type": "error", "id": msg["id"], "error": {
                    "code": "RATE_LIMIT_EXCEEDED", "message": "slow down",
                    "details": {"retry_after_s": 7}}}))
            elif msg["type"] == "inference":
                ws.send(json.dumps({"type": "token", "id": msg["id"], "token": "partial", "index": 0}))
                ws.close()

        ws.on_message(on_message)

    page.route_web_socket("**/ws", fake_ws)
    authorizations: list[str] = []
    page.on("request", lambda r: authorizations.append(r.headers.get("authorization", "")))
    try:
        page.goto(base_url + "/")
        page.wait_for_selector("#model option[value='mock-5ms']", state="attached")
        page.fill("#api-key", "sk-wrong")
        page.click("#key-save")
        page.wait_for_function("() => !document.getElementById('banner').hidden")
        assert "AUTHENTICATION_FAILED" in page.inner_text("#banner")
        assert page.evaluate("sessionStorage.getItem('troupe.apiKey')") == "sk-wrong"
        assert page.evaluate("localStorage.length") == 0
        assert "Bearer sk-wrong" in authorizations

        reply = _send(page, "mock-slow", "Hi", 8)
        reply.locator(".note.error").wait_for()
        assert "Retry in 7 s" in reply.inner_text()
        # The wrong-key banner stays: it outranks the rate limit (shown in the reply).
        assert "AUTHENTICATION_FAILED" in page.inner_text("#banner")

        reply = _send(page, "mock-5ms", "Hi", 8)
        reply.locator(".note.error").wait_for()
        assert "partial" in reply.inner_text() and "Connection lost" in reply.inner_text()
        page.wait_for_function("() => document.getElementById('conn').classList.contains('up')")
        assert len(sockets) >= 3  # first socket, the one with the key, and the reconnect

        page.fill("#api-key", "")  # no key: no auth error; HTTP answers from here
        page.click("#key-save")
        assert page.evaluate("sessionStorage.getItem('troupe.apiKey')") is None
        page.route("**/v1/usage*", lambda route: route.fulfill(
            status=429, headers={"Retry-After": "12"}, body="{}"))
        page.wait_for_function(
            "() => document.getElementById('banner').textContent.includes('Retry in 12 s')",
            timeout=8_000)
        page.route("**/v1/models", lambda route: route.fulfill(status=401, body="{}"))
        page.click("#key-save")
        page.wait_for_function(
            "() => document.getElementById('banner').textContent.includes('HTTP 401')")
    finally:
        context.close()

"""The playground against a gateway with auth on (real API keys in a SQLite store).

A second Troupe app is deployed under a route prefix, so this also shows the page works
when the gateway is mounted below ``/``: every URL the page uses is relative to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.browser.test_playground import DESKTOP, browser  # noqa: F401  (the module-scoped Chromium)

pytestmark = pytest.mark.browser

PREFIX = "/pgauth"


@pytest.fixture(scope="module")
def auth_app(serve_instance: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    from ray import serve

    from serve_app.build.app import build_app
    from serve_app.policies.keys import mint_key
    from serve_app.store.sqlite import SQLiteStore

    path = tmp_path_factory.mktemp("pgauth") / "state.db"
    token, row = mint_key("browser", "workspace")

    async def create() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.key_create(row)
        await store.close()

    # Playwright's sync API owns this thread's event loop: run the store on another thread.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, create()).result()
    args = {
        "models": [{"id": "guarded", "engine": {"type": "mock", "token_delay_ms": 5},
                    "deployment": {"max_ongoing_requests": 16,
                                   "ray_actor_options": {"num_cpus": 0.05}}}],
        "gateway": {"ray_actor_options": {"num_cpus": 0.05}},
        "metrics": {"store_url": "sqlite:///" + str(path).lstrip("/"), "flush_interval_s": 0.2,
                    "serve_poll_interval_s": 0},
        "auth": {"key_refresh_s": 0.5},
    }
    serve.run(build_app(args), name="pgauth", route_prefix=PREFIX)
    try:
        yield {"url": f"http://127.0.0.1:{serve_instance}{PREFIX}/", "key": token}
    finally:
        serve.delete("pgauth")


@pytest.fixture()
def page(browser: Any, auth_app: dict[str, str]) -> Iterator[Any]:
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    page.set_default_timeout(15_000)
    page.goto(auth_app["url"])
    yield page
    context.close()


def _banner(page: Any, text: str) -> str:
    page.wait_for_function(
        "(t) => { const b = document.getElementById('banner'); return !b.hidden && b.textContent.includes(t); }",
        arg=text)
    return page.inner_text("#banner")


def test_no_key_then_wrong_key_then_the_right_key(page: Any, auth_app: dict[str, str]) -> None:
    assert "needs an API key" in _banner(page, "HTTP 401")
    page.fill("#api-key", "trp_nope_notakey")
    page.click("#key-save")
    assert "rejected" in _banner(page, "rejected")
    # The real key: models load under the prefix, the socket authenticates, a chat streams.
    page.fill("#api-key", auth_app["key"])
    page.click("#key-save")
    page.wait_for_selector("#model option[value='guarded']", state="attached")
    page.wait_for_selector("#conn.up")
    page.fill("#max-tokens", "8")
    page.fill("#prompt", "hello")
    page.press("#prompt", "Enter")
    stats = page.locator(".msg.assistant .stats")
    stats.wait_for()
    assert "/ 8 out" in stats.locator("[data-metric=tokens]").inner_text()
    assert page.locator(".msg.assistant .note.error").count() == 0
    assert page.is_hidden("#banner")

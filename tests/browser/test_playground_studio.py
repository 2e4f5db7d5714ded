"""The playground's speech, transcription and image panels in a real Chromium.

Against the session's Serve app (mock engines for every modality). Transcription is fed
by Chromium's fake microphone (``--use-fake-device-for-media-stream``, a beeping tone),
recorded by the page's MediaRecorder as WebM/Opus and posted as multipart.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.browser.test_playground import DESKTOP, DOCS, chromium

pytestmark = pytest.mark.browser

FAKE_MEDIA = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")


def _model_with(base_url: str, capability: str) -> str:
    models = httpx.get(base_url + "/models", timeout=10).json()["models"]
    for model in models:
        if capability in model.get("capabilities", []):
            return model["id"]
    raise AssertionError(f"the test app has no {capability} model: {models}")


@pytest.fixture(scope="module")
def media_browser() -> Iterator[Any]:
    """Chromium with a fake microphone that needs no permission prompt."""
    with chromium(FAKE_MEDIA) as launched:
        yield launched


@pytest.fixture()
def page(media_browser: Any, base_url: str) -> Iterator[Any]:
    context = media_browser.new_context(viewport=DESKTOP, permissions=["microphone"])
    page = context.new_page()
    page.set_default_timeout(20_000)
    page.goto(base_url + "/")
    page.wait_for_selector("#conn.up")
    page.wait_for_selector("#tts-model option", state="attached")
    yield page
    context.close()


def test_models_are_grouped_by_capability(page: Any, base_url: str) -> None:
    tts = _model_with(base_url, "text-to-speech")
    asr = _model_with(base_url, "speech-to-text")
    image = _model_with(base_url, "image-generation")
    assert page.locator(f"#tts-model option[value='{tts}']").count() == 1
    assert page.locator(f"#asr-model option[value='{asr}']").count() == 1
    assert page.locator(f"#img-model option[value='{image}']").count() == 1
    # A speech model is not offered for chat, and a chat model not for speech.
    assert page.locator(f"#model option[value='{tts}']").count() == 0
    assert page.locator("#tts-model option[value='mock-5ms']").count() == 0


def test_speech_plays_in_the_audio_element(page: Any, base_url: str) -> None:
    page.select_option("#tts-model", _model_with(base_url, "text-to-speech"))
    page.fill("#tts-text", "Hello from the browser test.")
    page.click("#tts-go")
    page.wait_for_function(
        "() => { const a = document.getElementById('tts-audio');"
        " return a.readyState >= 2 && a.duration > 0; }")
    assert page.evaluate("document.getElementById('tts-audio').duration") > 0.1
    assert page.inner_text("#tts-status").startswith("Done")


def test_microphone_recording_is_transcribed(page: Any, base_url: str) -> None:
    page.select_option("#asr-model", _model_with(base_url, "speech-to-text"))
    page.click("#asr-record")
    page.wait_for_function("() => document.getElementById('asr-status').textContent === 'Recording…'")
    page.wait_for_timeout(1200)  # a little over a second of the fake microphone's tone
    page.click("#asr-record")
    page.wait_for_function("() => document.getElementById('asr-status').textContent.startsWith('Done')")
    assert page.inner_text("#asr-text").strip(), "no transcript shown"
    assert page.get_attribute("#asr-record", "aria-pressed") == "false"


def test_uploaded_file_that_is_not_audio_gets_a_clear_error(page: Any, base_url: str, tmp_path: Any) -> None:
    bogus = tmp_path / "notes.wav"
    bogus.write_bytes(b"this is not audio at all" * 20)
    page.select_option("#asr-model", _model_with(base_url, "speech-to-text"))
    page.set_input_files("#asr-file", str(bogus))
    page.click("#asr-go")
    page.wait_for_function("() => document.getElementById('asr-status').textContent.startsWith('Error')")
    assert "HTTP 400" in page.inner_text("#asr-status")


def test_an_image_renders_at_the_requested_size(page: Any, base_url: str) -> None:
    page.select_option("#img-model", _model_with(base_url, "image-generation"))
    size = page.eval_on_selector("#img-size", "s => s.value")
    page.fill("#img-prompt", "a lighthouse")
    page.click("#img-go")
    page.wait_for_function(
        "() => { const i = document.getElementById('img-out'); return !i.hidden && i.complete && i.naturalWidth > 0; }")
    width = page.evaluate("document.getElementById('img-out').naturalWidth")
    assert f"{width}x{width}" == size
    # The whole page with the image and a transcript, for the README.
    page.fill("#tts-text", "Speech from the playground.")
    page.click("#tts-go")
    page.wait_for_function("() => document.getElementById('tts-status').textContent.startsWith('Done')")
    page.screenshot(path=str(DOCS / "playground-studio.png"), full_page=True)

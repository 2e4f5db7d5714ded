"""The playground's Talk card in a real Chromium: a spoken turn over /v1/realtime.

Chromium's fake microphone plays an espeak-ng WAV (a question between silences, once),
the page streams it as 24 kHz PCM16, the server's VAD ends the turn, and the mock models'
transcript and spoken answer come back (against the session's Serve app).
"""

from __future__ import annotations

import shutil
import subprocess
import wave
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.test_playground import DESKTOP, chromium

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")]


def _question_wav(folder: Any) -> str:
    spoken = folder / "spoken.wav"
    subprocess.run(["espeak-ng", "-w", str(spoken), "What is the capital of France?"], check=True)
    with wave.open(str(spoken)) as w:
        rate, pcm = w.getframerate(), w.readframes(w.getnframes())
    path = folder / "question.wav"
    with wave.open(str(path), "wb") as w:  # silence, the question, a long silence (turn end)
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(rate)
        w.writeframes(bytes(rate * 2) + pcm + bytes(rate * 2 * 4))
    return str(path)


@pytest.fixture(scope="module")
def talking_browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    wav = _question_wav(tmp_path_factory.mktemp("mic"))
    args = ("--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream",
            f"--use-file-for-fake-audio-capture={wav}%noloop", "--autoplay-policy=no-user-gesture-required")
    with chromium(args) as launched:
        yield launched


def test_talk_card_completes_a_spoken_turn(talking_browser: Any, base_url: str) -> None:
    context = talking_browser.new_context(viewport=DESKTOP, permissions=["microphone"])
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(base_url + "/")
        page.wait_for_selector("#model option[value='mock-5ms']", state="attached")
        page.select_option("#model", "mock-5ms")
        page.click("#talk-go")
        page.wait_for_function(
            "() => document.getElementById('talk-log').textContent.includes('You: hello from the mock transcriber')")
        page.wait_for_function("() => document.querySelector('#talk-log .talk-assistant') !== null")
        page.wait_for_function("() => document.getElementById('talk-ttfa').textContent.startsWith('first audio')")
        assert page.get_attribute("#talk-go", "aria-pressed") == "true"
        page.click("#talk-go")
        assert page.inner_text("#talk-status") == "Stopped."
    finally:
        context.close()

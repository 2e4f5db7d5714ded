"""A spoken turn over /v1/realtime on the bundled models, with the official openai client.

Piper says "What is the capital of France?"; the audio goes in 20 ms chunks with server
VAD; Whisper hears it, SmolLM2 answers, Piper speaks; Whisper then transcribes the spoken
answer, which must say Paris.
"""

from __future__ import annotations

import asyncio
import json
from typing import Iterator

import httpx
import pytest

from bench.realtime_bench import pcm24_wav, realtime_turn, spoken_question, trio_args

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def trio_url(serve_instance: int) -> Iterator[str]:
    from ray import serve

    from serve_app.build.app import build_app

    serve.run(build_app(trio_args()), name="realtime-trio", route_prefix="/trio")
    url = f"http://127.0.0.1:{serve_instance}/trio"
    assert httpx.get(url + "/health", timeout=120).json()["status"] == "ok"
    yield url
    serve.delete("realtime-trio")


async def test_spoken_question_gets_a_spoken_answer_that_says_paris(trio_url: str) -> None:
    _, question = spoken_question(trio_url)
    turn = await realtime_turn(trio_url, question, vad=True)
    assert turn["status"] == "completed"
    assert "capital of france" in turn["transcript"].lower()
    assert len(turn["audio"]) > 24000 * 2 // 2  # at least half a second of answer
    heard = httpx.post(trio_url + "/v1/audio/transcriptions", timeout=120,
                       files={"file": ("answer.wav", pcm24_wav(turn["audio"]), "audio/wav")},
                       data={"model": "whisper-tiny-en"})
    heard.raise_for_status()
    # The model says Paris, and the spoken answer is that reply: Whisper hears its words back
    # (not necessarily the name itself: it heard "Le Grand Paris" as "grandparents").
    assert "paris" in turn["reply"].lower(), turn["reply"]
    assert "capital of france" in heard.json()["text"].lower(), (turn["reply"], heard.json()["text"])
    assert turn["server_ttfa_ms"] is not None and turn["ttfa_ms"] > 0


async def test_smollm2_makes_a_required_function_call_with_valid_arguments(trio_url: str) -> None:
    from openai import AsyncOpenAI

    weather = {"type": "function", "name": "get_weather", "description": "The weather in a city.",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                              "required": ["city"]}}
    client = AsyncOpenAI(api_key="unused", base_url=trio_url + "/v1",
                         websocket_base_url=trio_url.replace("http://", "ws://") + "/v1")
    async with client.realtime.connect(model="smollm2-135m") as conn:
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "tools": [weather], "tool_choice": "required"})
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is the weather in Paris?"}]})
        await conn.response.create()
        async with asyncio.timeout(120):
            async for event in conn:
                assert event.type != "error", event
                if event.type == "response.done":
                    break
    call = event.response.output[0]
    assert call.type == "function_call" and call.name == "get_weather"
    assert isinstance(json.loads(call.arguments)["city"], str)  # constrained decoding: valid JSON

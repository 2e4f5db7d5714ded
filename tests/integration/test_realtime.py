"""/v1/realtime through real Serve (mock engines), driven by the official ``openai`` client.

Speech for the server VAD is made by espeak-ng (the same program Piper uses), so the
Silero VAD hears real speech; the mock transcriber then answers its fixed text.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
import wave
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI

from serve_app.realtime.audio import Resampler
from tests.conftest import wait_until
from tests.integration.test_websocket import engine_active_async, wait_engine_idle

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")

TURN = {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 400}
AUDIO_SESSION = {
    "type": "realtime",
    "output_modalities": ["audio"],
    "audio": {"input": {"transcription": {"model": "mock-transcription"}, "turn_detection": TURN},
              "output": {"model": "mock-speech", "voice": "alloy"}},
}


def spoken(text: str, tmp_path: Any) -> bytes:
    """``text`` spoken by espeak-ng, as 16-bit PCM at 24 kHz."""
    path = tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(path), text], check=True, timeout=30)
    with wave.open(str(path)) as w:
        rate, pcm = w.getframerate(), w.readframes(w.getnframes())
    return Resampler(rate, 24000)(pcm, last=True)


def quiet(seconds: float) -> bytes:
    return bytes(int(24000 * seconds) * 2)


def client(base_url: str) -> AsyncOpenAI:
    ws = base_url.replace("http://", "ws://")
    return AsyncOpenAI(api_key="trp-unused", base_url=base_url + "/v1", websocket_base_url=ws + "/v1")


async def send_audio(conn: Any, pcm: bytes, chunk_ms: int = 20) -> None:
    step = 24000 * 2 * chunk_ms // 1000
    for i in range(0, len(pcm), step):
        await conn.input_audio_buffer.append(audio=base64.b64encode(pcm[i:i + step]).decode())


async def events_until(conn: Any, kind: str, seen: list[Any], timeout: float = 30) -> Any:
    """Read events into ``seen`` until one of type ``kind`` arrives."""
    async with asyncio.timeout(timeout):
        while True:
            event = await conn.recv()
            seen.append(event)
            if event.type == kind:
                return event


async def test_official_client_spoken_turn_with_server_vad(base_url: str, tmp_path: Any) -> None:
    question = spoken("What is the capital of France?", tmp_path)
    seen: list[Any] = []
    t0 = time.time()
    async with client(base_url).realtime.connect(model="mock-5ms") as conn:
        created = await events_until(conn, "session.created", seen)
        assert created.session.model == "mock-5ms"
        await conn.session.update(session=AUDIO_SESSION)
        await events_until(conn, "session.updated", seen)
        await send_audio(conn, quiet(0.5) + question + quiet(1.0))
        done = await events_until(conn, "response.done", seen)
    kinds = [e.type for e in seen]
    for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                 "input_audio_buffer.committed", "conversation.item.input_audio_transcription.completed",
                 "response.created", "response.output_audio_transcript.delta",
                 "response.output_audio.delta", "response.output_audio.done"):
        assert kind in kinds, (kind, kinds)
    started = next(e for e in seen if e.type == "input_audio_buffer.speech_started")
    assert 100 <= started.audio_start_ms <= 600  # speech began at 500 ms, less 300 ms padding
    heard = next(e for e in seen if e.type == "conversation.item.input_audio_transcription.completed")
    assert heard.transcript == "hello from the mock transcriber"
    audio = b"".join(base64.b64decode(e.delta) for e in seen if e.type == "response.output_audio.delta")
    assert len(audio) > 24000  # over half a second of 24 kHz PCM16 answer
    assert done.response.status == "completed"
    assert done.response.usage.output_tokens > 0 and done.response.usage.input_tokens > 0
    figures = done.response.model_extra["troupe"]
    assert figures["audio_in_seconds"] > 1.5 and figures["audio_out_seconds"] > 0.5
    assert figures["ttfa_ms"] > 0
    # metered: the three model calls in the ledger under the route; the text model's row is
    # the response's, with the turn's audio seconds and TTFA (exactly what response.done said)
    usage = wait_until(lambda: (u := by_route(base_url, t0)).get("/v1/realtime", {}).get(
        "latency_ms", {}).get("ttfa", {}).get("count") and u, timeout=15, interval=0.1)
    assert usage["/v1/realtime"]["requests"] >= 3  # speech-to-text, text, speech
    row = usage["/v1/realtime"]
    assert row["errors"] == 0
    assert row["audio_seconds"] == {"input": figures["audio_in_seconds"],
                                    "output": figures["audio_out_seconds"]}
    assert row["latency_ms"]["ttfa"]["count"] == 1
    assert abs(row["latency_ms"]["ttfa"]["p50"] - figures["ttfa_ms"]) < 0.1
    assert row["completion_tokens"] >= done.response.usage.output_tokens
    # and in Prometheus: TTFA as a histogram of the ledger, audio seconds as counters
    series = 'model="mock-5ms",route="/v1/realtime",tier="default"'
    metrics = wait_until(lambda: (t := httpx.get(base_url + "/metrics", timeout=10).text).count(
        f"troupe_realtime_ttfa_seconds_count{{{series}}}") and t, timeout=15, interval=0.1)
    assert f'troupe_realtime_ttfa_seconds_bucket{{le="+Inf",{series}}}' in metrics
    assert 'troupe_custom_realtime_audio_input_seconds_total{model="mock-5ms"}' in metrics
    assert 'troupe_custom_realtime_responses_total{model="mock-5ms",status="completed"}' in metrics


def by_route(base_url: str, start: float) -> dict[str, Any]:
    body = httpx.get(base_url + "/v1/usage", params={"group_by": "route", "start": start}, timeout=10).json()
    return {g["group"]: g for g in body["groups"]}


async def test_bad_input_errors_keep_the_session(base_url: str) -> None:
    seen: list[Any] = []
    async with client(base_url).realtime.connect(model="mock-5ms") as conn:
        await events_until(conn, "session.created", seen)
        await conn.send({"type": "input_audio_buffer.explode"})  # type: ignore[arg-type]
        err = await events_until(conn, "error", seen)
        assert err.error.code == "invalid_event_type"
        await conn.input_audio_buffer.append(audio="%%% not base64 %%%")
        err = await events_until(conn, "error", seen)
        assert (err.error.code, err.error.param) == ("invalid_audio", "audio")
        await conn.input_audio_buffer.commit()
        err = await events_until(conn, "error", seen)
        assert err.error.code == "input_audio_buffer_commit_empty"
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"]})
        await events_until(conn, "session.updated", seen)
        await conn.conversation.item.create(item={
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello?"}]})
        await conn.response.create()
        done = await events_until(conn, "response.done", seen)
        assert done.response.status == "completed"
        assert any(e.type == "response.output_text.delta" for e in seen)


async def test_unknown_model_is_an_error_event(base_url: str) -> None:
    seen: list[Any] = []
    async with client(base_url).realtime.connect(model="no-such-model") as conn:
        err = await events_until(conn, "error", seen)
    assert err.error.code == "model_not_found"


async def test_barge_in_stops_the_answer_and_the_engines(base_url: str, tmp_path: Any) -> None:
    question = spoken("Tell me a long story.", tmp_path)
    seen: list[Any] = []
    async with client(base_url).realtime.connect(model="mock-slow") as conn:
        await events_until(conn, "session.created", seen)
        await conn.session.update(session=AUDIO_SESSION)
        await events_until(conn, "session.updated", seen)
        await send_audio(conn, quiet(0.3) + question + quiet(0.8))
        await events_until(conn, "response.output_audio_transcript.delta", seen)
        assert await engine_active_async(base_url, "mock-slow") == 1  # mock-slow writes for ~16 s
        arrivals: list[tuple[float, Any]] = []

        async def read() -> None:  # timestamps events as they arrive, while audio is sent
            while True:
                event = await conn.recv()
                arrivals.append((time.monotonic(), event))
                if event.type == "response.done":
                    return

        reader = asyncio.create_task(read())
        await send_audio(conn, question[: 24000 * 2])  # the user talks over the answer
        await asyncio.wait_for(reader, 10)
        assert await wait_engine_idle(base_url, "mock-slow", 5.0) < 5.0
    at = {e.type: t for t, e in reversed(arrivals)}
    done = arrivals[-1][1]
    assert done.response.status == "cancelled"
    assert done.response.status_details.reason == "turn_detected"
    assert at["response.done"] - at["input_audio_buffer.speech_started"] < 0.3


WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


async def test_official_client_function_call_round_trip(base_url: str) -> None:
    seen: list[Any] = []
    async with client(base_url).realtime.connect(model="mock-5ms") as conn:
        await events_until(conn, "session.created", seen)
        await conn.session.update(session={"type": "realtime", "output_modalities": ["text"],
                                           "tools": [WEATHER], "tool_choice": "auto"})
        updated = await events_until(conn, "session.updated", seen)
        assert updated.session.tools[0].name == "get_weather"
        await conn.conversation.item.create(item={"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is the weather in Paris? Use get_weather."}]})
        await conn.response.create()
        done = await events_until(conn, "response.done", seen)
        calls = [o for o in done.response.output if o.type == "function_call"]
        assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].status == "completed"
        arguments = json.loads(calls[0].arguments)
        assert isinstance(arguments["city"], str)  # valid against the tool's schema
        added = next(e for e in seen if e.type == "response.output_item.added")
        assert (added.item.type, added.item.call_id) == ("function_call", calls[0].call_id)
        deltas = [e.delta for e in seen if e.type == "response.function_call_arguments.delta"]
        args_done = next(e for e in seen if e.type == "response.function_call_arguments.done")
        assert "".join(deltas) == args_done.arguments == calls[0].arguments
        await conn.conversation.item.create(item={"type": "function_call_output",
                                                  "call_id": calls[0].call_id,
                                                  "output": json.dumps({"temp_c": 21})})
        await events_until(conn, "conversation.item.done", seen)
        await conn.response.create()
        seen.clear()
        done = await events_until(conn, "response.done", seen)
    assert done.response.status == "completed"
    assert [o.type for o in done.response.output] == ["message"]
    text = next(e for e in seen if e.type == "response.output_text.done").text
    assert text  # the answer after the tool result

"""TTFA of a spoken turn on the bundled models: ``/v1/realtime`` against ``/ws`` voice.

TTFA is the time to first audio: from the end of the user's speech to the first audio of
the answer. Each turn sends the same spoken question (made by the Piper voice through
``POST /v1/audio/speech``) to Whisper tiny.en -> SmolLM2-135M -> Piper, three ways:

* ``realtime-ptt``: ``/v1/realtime`` push-to-talk, with the official ``openai`` client:
  the audio, ``input_audio_buffer.commit`` and ``response.create``; TTFA from sending
  ``response.create`` to the first ``response.output_audio.delta``.
* ``realtime-vad``: ``/v1/realtime`` with server VAD: the audio with a second of silence
  after it; TTFA from the ``speech_stopped`` event to the first audio delta (client side),
  and the gateway's own figure (``response.done`` -> ``troupe.ttfa_ms``).
* ``ws-voice``: ``/ws`` voice messages: ``voice.start``, binary PCM frames, ``voice.end``;
  TTFA from sending ``voice.end`` to the first binary audio frame.

Turns rotate among the three, so machine load hits each alike. Run under the shared Ray
lock::

    python -m bench.realtime_bench --turns 20

Writes ``bench/results/<UTC>-realtime.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import statistics
import time
import wave
from pathlib import Path
from typing import Any

import httpx
import yaml

RESULTS = Path(__file__).resolve().parent / "results"
CONFIG = Path(__file__).resolve().parent.parent / "config" / "local.yaml"
TRIO = ("smollm2-135m", "piper-joe", "whisper-tiny-en")
QUESTION = "What is the capital of France?"
MAX_TOKENS = 48
CHUNK_MS = 20


def trio_args() -> dict[str, Any]:
    """config/local.yaml's application args, with only the speech-to-speech trio."""
    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    args["models"] = [m for m in args["models"] if m["id"] in TRIO]
    return args


def deploy(port: int) -> str:
    """Start a private Ray + Serve on ``port`` and deploy the trio; returns the base URL."""
    from ray import serve

    from bench.run_bench import prepare_environment, start_ray
    from serve_app.build.app import build_app

    prepare_environment(False)
    start_ray(2)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(trio_args()), name="realtime-bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    assert httpx.get(url + "/health", timeout=120).status_code == 200
    return url


def spoken_question(url: str, text: str = QUESTION) -> tuple[bytes, bytes]:
    """(WAV bytes at the voice's rate, 16-bit PCM at 24 kHz) of ``text`` said by Piper."""
    from serve_app.realtime.audio import Resampler

    r = httpx.post(url + "/v1/audio/speech", timeout=120, json={
        "model": "piper-joe", "voice": "alloy", "input": text, "response_format": "wav"})
    r.raise_for_status()
    with wave.open(io.BytesIO(r.content)) as w:
        rate, pcm = w.getframerate(), w.readframes(w.getnframes())
    return r.content, Resampler(rate, 24000)(pcm, last=True)


def pcm24_wav(pcm: bytes) -> bytes:
    from serve_app.gateway.voice import wav_from_pcm

    return wav_from_pcm(pcm, 24000)


def _client(url: str) -> Any:
    from openai import AsyncOpenAI

    ws = url.replace("http://", "ws://")
    return AsyncOpenAI(api_key="trp-unused", base_url=url + "/v1", websocket_base_url=ws + "/v1")


async def realtime_turn(url: str, pcm24: bytes, vad: bool, timeout: float = 120) -> dict[str, Any]:
    """One spoken turn over /v1/realtime; returns timings, transcript, reply text and audio."""
    turn = ({"type": "server_vad", "silence_duration_ms": 500} if vad else None)
    step = 24000 * 2 * CHUNK_MS // 1000
    audio = pcm24 + (bytes(24000 * 2) if vad else b"")
    out: dict[str, Any] = {"mode": "realtime-vad" if vad else "realtime-ptt", "audio": b""}
    async with _client(url).realtime.connect(model="smollm2-135m") as conn:
        await conn.session.update(session={"type": "realtime", "max_output_tokens": MAX_TOKENS,
                                           "audio": {"input": {"turn_detection": turn}}})
        for i in range(0, len(audio), step):
            await conn.input_audio_buffer.append(audio=base64.b64encode(audio[i:i + step]).decode())
        end = None
        if not vad:
            await conn.input_audio_buffer.commit()
            await conn.response.create()
            end = time.perf_counter()
        async with asyncio.timeout(timeout):
            async for event in conn:
                if event.type == "input_audio_buffer.speech_stopped":
                    end = time.perf_counter()
                elif event.type == "conversation.item.input_audio_transcription.completed":
                    out["transcript"] = event.transcript
                elif event.type == "response.output_audio.delta":
                    if "ttfa_ms" not in out and end is not None:
                        out["ttfa_ms"] = (time.perf_counter() - end) * 1000
                    out["audio"] += base64.b64decode(event.delta)
                elif event.type == "response.output_audio_transcript.done":
                    out["reply"] = event.transcript
                elif event.type == "error":
                    raise RuntimeError(f"realtime error: {event.error}")
                elif event.type == "response.done":
                    extra = (event.response.model_extra or {}).get("troupe") or {}
                    out["server_ttfa_ms"] = extra.get("ttfa_ms")
                    out["status"] = event.response.status
                    break
    return out


async def ws_voice_turn(url: str, pcm24: bytes, timeout: float = 120) -> dict[str, Any]:
    """The same turn over /ws voice messages (raw PCM at 24 kHz)."""
    from websockets.asyncio.client import connect

    out: dict[str, Any] = {"mode": "ws-voice", "audio": b""}
    step = 24000 * 2 * CHUNK_MS // 1000
    async with connect(url.replace("http://", "ws://") + "/ws", max_size=None) as ws:
        await ws.send(json.dumps({"type": "voice.start", "id": "v", "format": "pcm", "sample_rate": 24000,
                                  "llm": "smollm2-135m", "max_tokens": MAX_TOKENS}))
        for i in range(0, len(pcm24), step):
            await ws.send(pcm24[i:i + step])
        await ws.send(json.dumps({"type": "voice.end", "id": "v"}))
        end = time.perf_counter()
        async with asyncio.timeout(timeout):
            async for message in ws:
                if isinstance(message, bytes):
                    out.setdefault("ttfa_ms", (time.perf_counter() - end) * 1000)
                    out["audio"] += message
                    continue
                msg = json.loads(message)
                if msg["type"] == "transcript":
                    out["transcript"] = msg["text"]
                elif msg["type"] == "error":
                    raise RuntimeError(f"/ws error: {msg}")
                elif msg["type"] == "complete":
                    out["reply"] = msg["reply"]
                    out["status"] = "completed"
                    break
    return out


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))]


def summarize(turns: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in ("realtime-ptt", "realtime-vad", "ws-voice"):
        ttfa = [t["ttfa_ms"] for t in turns if t["mode"] == mode and "ttfa_ms" in t]
        if not ttfa:
            continue
        row = {"n": len(ttfa), "p50_ms": round(_pct(ttfa, 50), 1), "p90_ms": round(_pct(ttfa, 90), 1),
               "mean_ms": round(statistics.fmean(ttfa), 1)}
        server = [t["server_ttfa_ms"] for t in turns if t["mode"] == mode and t.get("server_ttfa_ms")]
        if server:
            row["server_p50_ms"] = round(_pct(server, 50), 1)
            row["server_p90_ms"] = round(_pct(server, 90), 1)
        summary[mode] = row
    return summary


async def run_turns(url: str, pcm24: bytes, turns: int, warmup: int = 1) -> list[dict[str, Any]]:
    modes = [lambda: realtime_turn(url, pcm24, vad=False), lambda: realtime_turn(url, pcm24, vad=True),
             lambda: ws_voice_turn(url, pcm24)]
    for make in modes * warmup:  # first calls load caches and JIT paths
        await make()
    results = []
    for n in range(turns):
        for make in modes[n % 3:] + modes[:n % 3]:  # rotate which goes first
            turn = await make()
            turn.pop("audio")
            results.append(turn)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=20, help="turns per mode")
    parser.add_argument("--url", help="a running Troupe with the trio (default: deploy one)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    url = args.url
    if url is None:
        from bench.run_bench import _free_port

        url = deploy(_free_port())
    _, pcm24 = spoken_question(url)
    started = time.time()
    turns = asyncio.run(run_turns(url, pcm24, args.turns))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(started))
    summary = summarize(turns)
    body = {"started": stamp, "host": platform.node(), "cpus": os.cpu_count(),
            "load_avg": os.getloadavg(), "models": TRIO, "question": QUESTION,
            "max_tokens": MAX_TOKENS, "summary": summary, "turns": turns}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}-realtime.json").write_text(json.dumps(body, indent=1))
    lines = [f"# TTFA, {args.turns} turns per mode ({stamp}, load {os.getloadavg()[0]:.1f})", "",
             "| mode | n | p50 ms | p90 ms | mean ms | gateway p50 ms | gateway p90 ms |",
             "|---|---|---|---|---|---|---|"]
    for mode, row in summary.items():
        lines.append(f"| {mode} | {row['n']} | {row['p50_ms']} | {row['p90_ms']} | {row['mean_ms']} | "
                     f"{row.get('server_p50_ms', '-')} | {row.get('server_p90_ms', '-')} |")
    (RESULTS / f"{stamp}-realtime.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Embeddings, speech, transcription, images and load/unload through the real Serve app
(mock engines), with the official openai client."""

from __future__ import annotations

import base64
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from openai import OpenAI

from deployments.audio import decode_audio, encode_audio
from tests.conftest import wait_until


@pytest.fixture(scope="module")
def client(base_url: str) -> OpenAI:
    return OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def _wav(seconds: float = 1.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    return encode_audio((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000, "wav")


def test_embeddings_with_openai_client(client: OpenAI) -> None:
    r = client.embeddings.create(model="mock-embeddings", input="the cat sat")  # base64 on the wire
    assert len(r.data) == 1 and len(r.data[0].embedding) == 384
    assert abs(np.linalg.norm(r.data[0].embedding) - 1) < 1e-4
    assert r.usage.prompt_tokens == 3
    f = client.embeddings.create(model="mock-embeddings", input=["eating apples", "eating pears", "tax law"],
                                 encoding_format="float")
    v = [np.array(d.embedding) for d in f.data]
    assert v[0] @ v[1] > v[0] @ v[2]
    assert np.allclose(client.embeddings.create(model="mock-embeddings", input="eating apples").data[0].embedding, v[0],
                       atol=1e-6)
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model="mock-5ms", input="x")
    assert "text-generation" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="mock-embeddings", input="")


def test_concurrent_embeddings_share_batches(base_url: str) -> None:
    """48 requests from 16 threads: merged by the gateway into a few embed_many calls."""
    from ray import serve

    def one(i: int) -> int:
        r = httpx.post(base_url + "/v1/embeddings", json={"model": "mock-embeddings", "input": f"word{i}"},
                       timeout=30)
        return r.status_code

    handle = serve.get_deployment_handle("Embeddings_mock-embeddings", app_name="troupe")
    before = handle.stats.remote().result(timeout_s=10)
    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(one, range(48))) == {200}
    stats = handle.stats.remote().result(timeout_s=10)
    assert stats["largest_batch"] > 1, stats  # the gateway merged concurrent callers
    passes = stats["forward_passes"] - before["forward_passes"]
    served = stats["batched_requests"] - before["batched_requests"]
    assert served == 48 and passes < 48 / 2, (passes, served)  # into fewer forward passes


def test_native_embeddings(http: httpx.Client) -> None:
    r = http.post("/embeddings", json={"model": "mock-embeddings", "input": ["a", "b"], "encoding_format": "base64"})
    assert r.status_code == 200 and r.json()["dimensions"] == 384
    raw = base64.b64decode(r.json()["data"][1]["embedding"])
    assert len(raw) == 384 * 4
    bad = http.post("/embeddings", json={"model": "mock-embeddings", "input": []})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "INVALID_REQUEST"


def test_speech_with_openai_client(client: OpenAI) -> None:
    audio = client.audio.speech.create(model="mock-speech", voice="alloy", input="Hello world. Second sentence.")
    samples = decode_audio(audio.content)  # mp3 by default
    assert 0.15 < samples.size / 16000 < 0.4
    with client.audio.speech.with_streaming_response.create(
        model="mock-speech", voice="nova", input="One. Two. Three.", response_format="wav"
    ) as resp:
        assert resp.headers["content-type"] == "audio/wav"
        chunks = list(resp.iter_bytes())
    assert b"".join(chunks)[:4] == b"RIFF"
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.speech.create(model="mock-speech", voice="nobody", input="hi")
    assert "alloy" in info.value.body["message"]


def test_transcription_with_openai_client(client: OpenAI) -> None:
    t = client.audio.transcriptions.create(model="mock-transcription", file=("a.wav", _wav(), "audio/wav"))
    assert t.text == "hello from the mock transcriber"
    v = client.audio.transcriptions.create(model="mock-transcription", file=("a.wav", _wav(2.0), "audio/wav"),
                                           response_format="verbose_json")
    assert v.duration == pytest.approx(2.0, abs=0.05) and len(v.segments) == 2
    srt = client.audio.transcriptions.create(model="mock-transcription", file=("a.wav", _wav(), "audio/wav"),
                                             response_format="srt")
    assert "00:00:00,000 --> " in srt
    with pytest.raises(openai.BadRequestError) as info:
        client.audio.transcriptions.create(model="mock-transcription", file=("a.wav", b"junk" * 100, "audio/wav"))
    assert info.value.body["param"] == "file"


def test_images_with_openai_client(client: OpenAI) -> None:
    from PIL import Image

    r = client.images.generate(model="mock-image", prompt="a lighthouse", n=2, size="256x256",
                               response_format="b64_json")
    assert len(r.data) == 2
    img = Image.open(io.BytesIO(base64.b64decode(r.data[0].b64_json)))
    assert img.format == "PNG" and img.size == (256, 256)
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="mock-image", prompt="x", size="1792x1024")
    assert "64x64" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.images.generate(model="mock-image", prompt="x", response_format="url")


def test_models_list_capabilities(http: httpx.Client, client: OpenAI) -> None:
    native = {m["id"]: m for m in http.get("/models").json()["models"]}
    assert native["mock-embeddings"]["capabilities"] == ["embeddings"]
    assert native["mock-speech"]["capabilities"][0] == "text-to-speech"
    assert native["mock-transcription"]["capabilities"] == ["speech-to-text"]
    assert native["mock-image"]["capabilities"] == ["image-generation"]
    v1 = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
    assert v1["mock-image"]["modality"] == "image"


def _running_replicas(deployment: str) -> int:
    from ray import serve

    status = serve.status().applications["troupe"].deployments[deployment]
    return status.replica_states.get("RUNNING", 0)


def test_unload_then_load(http: httpx.Client, client: OpenAI, ledger_path: str) -> None:
    r = http.post("/models/mock-image/unload")
    assert r.status_code == 200, r.text
    assert r.json()["memory"]["rss_mb_after"] > 0
    # The replica itself goes (the app is deployed with external_scaler_enabled), so all
    # of its memory is returned; /health answers at once and stays ok.
    assert r.json()["replicas"] == 0
    wait_until(lambda: _running_replicas("Image_mock-image") == 0, timeout=30)
    health = http.get("/health").json()
    assert health["status"] == "ok"
    assert {m["id"]: m["status"] for m in health["models"]}["mock-image"] == "unloaded"
    models = {m["id"]: m for m in http.get("/models").json()["models"]}
    assert models["mock-image"]["loaded"] is False and models["mock-speech"]["loaded"] is True
    with pytest.raises(openai.ConflictError) as info:
        client.images.generate(model="mock-image", prompt="x")
    assert info.value.body["code"] == "model_not_loaded"
    assert "POST /models/mock-image/load" in info.value.body["message"]
    # persisted beside the ledger: a redeploy of the same config reads it back
    state_file = os.path.join(os.path.dirname(ledger_path), "model_state.json")
    assert json.load(open(state_file)) == {"mock-image": False}
    assert http.post("/models/mock-image/load").json()["loaded"] is True
    assert json.load(open(state_file)) == {"mock-image": True}
    assert _running_replicas("Image_mock-image") == 1
    wait_until(lambda: http.post("/v1/images/generations", json={"model": "mock-image", "prompt": "x"})
               .status_code == 200, timeout=10)


def test_voice_pipeline_http_and_websocket(base_url: str, http: httpx.Client) -> None:
    import asyncio

    from websockets.asyncio.client import connect

    r = http.post("/voice/pipeline?llm=mock-5ms&max_tokens=6", content=_wav(1.0),
                  headers={"content-type": "audio/wav"})
    assert r.status_code == 200, r.text
    assert r.json()["transcript"] == "hello from the mock transcriber"
    assert len(r.json()["reply"].split()) == 6
    assert decode_audio(base64.b64decode(r.json()["audio"])).size > 0

    async def scenario() -> list:
        events: list = []
        async with connect(base_url.replace("http://", "ws://") + "/ws") as ws:
            await ws.send(json.dumps({"type": "voice.start", "id": "v1", "format": "pcm",
                                      "sample_rate": 16000, "llm": "mock-5ms", "max_tokens": 6}))
            pcm = (np.sin(np.arange(16000) / 10) * 8000).astype("<i2").tobytes()
            for i in range(0, len(pcm), 8000):
                await ws.send(pcm[i:i + 8000])  # binary frames
            await ws.send(json.dumps({"type": "voice.end", "id": "v1"}))
            while True:
                msg = await asyncio.wait_for(ws.recv(), 30)
                if isinstance(msg, bytes):
                    events.append(("bytes", len(msg)))
                    continue
                data = json.loads(msg)
                events.append((data["type"], data))
                if data["type"] in ("complete", "error"):
                    return events

    events = asyncio.run(scenario())
    kinds = [k for k, _ in events]
    assert kinds[0] == "transcript" and events[0][1]["text"] == "hello from the mock transcriber"
    assert kinds[-1] == "complete", events[-1]
    assert "token" in kinds and kinds.index("token") < kinds.index("audio.start")
    start, end = kinds.index("audio.start"), kinds.index("audio.end")
    frames = [n for k, n in events[start:end] if k == "bytes"]
    assert frames and sum(frames) == 2 * int(22050 * 0.05) * 6  # pcm, 6 words of the mock voice
    assert events[start][1]["format"] == "pcm" and events[start][1]["sample_rate"] == 22050
    assert len(events[-1][1]["reply"].split()) == 6

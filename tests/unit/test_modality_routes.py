"""The modality routes in-process (mock engines, fake handles, no Ray): shapes, bad input,
wrong modality, metering, load/unload."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from deployments.audio import decode_audio, encode_audio
from tests.unit.modality_fakes import ModalityGateway, mgw  # noqa: F401



def _openai_error(r, status: int, param=None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param, err
    return err


def _wav(seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    return encode_audio((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), rate, "wav")


# ------------------------------------------------------------------ embeddings


async def test_embeddings_string_float_and_usage(mgw) -> None:
    r = await mgw.post("/v1/embeddings", json={"model": "emb", "input": "the cat sat"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "list" and body["model"] == "emb"
    vec = body["data"][0]["embedding"]
    assert len(vec) == 8 and abs(np.linalg.norm(vec) - 1) < 1e-5
    assert body["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    event = mgw.events[-1]
    assert (event.model, event.route, event.prompt_tokens, event.status) == ("emb", "/v1/embeddings", 3, 200)


async def test_embeddings_base64_matches_float(mgw) -> None:
    req = {"model": "emb", "input": ["a dog runs", "stock markets fell"]}
    f = (await mgw.post("/v1/embeddings", json=req)).json()
    b = (await mgw.post("/v1/embeddings", json={**req, "encoding_format": "base64"})).json()
    for fd, bd in zip(f["data"], b["data"]):
        decoded = np.frombuffer(base64.b64decode(bd["embedding"]), dtype="<f4")
        assert np.allclose(decoded, fd["embedding"])
    assert [d["index"] for d in b["data"]] == [0, 1]


async def test_embeddings_token_arrays_and_similarity(mgw) -> None:
    one = (await mgw.post("/v1/embeddings", json={"model": "emb", "input": [1, 2, 3]})).json()
    assert len(one["data"]) == 1 and one["usage"]["prompt_tokens"] == 3
    many = (await mgw.post("/v1/embeddings", json={"model": "emb", "input": [[1, 2], [3]]})).json()
    assert len(many["data"]) == 2
    r = (await mgw.post("/v1/embeddings", json={
        "model": "emb", "input": ["eating red apples", "eating green apples", "tax law reform"]})).json()
    v = [np.array(d["embedding"]) for d in r["data"]]
    assert v[0] @ v[1] > v[0] @ v[2]


async def test_embeddings_dimensions_and_native_route(mgw) -> None:
    r = (await mgw.post("/v1/embeddings", json={"model": "emb", "input": "x y", "dimensions": 4})).json()
    vec = r["data"][0]["embedding"]
    assert len(vec) == 4 and abs(np.linalg.norm(vec) - 1) < 1e-5
    n = await mgw.post("/embeddings", json={"model": "emb", "input": "hello"})
    assert n.status_code == 200 and n.json()["dimensions"] == 8 and n.json()["request_id"]


@pytest.mark.parametrize("body,param,words", [
    ({"model": "emb", "input": ""}, "input", "empty"),
    ({"model": "emb", "input": []}, "input", "empty"),
    ({"model": "emb", "input": ["ok", "  "]}, "input", "input[1]"),
    ({"model": "emb", "input": ["a", "b", "c", "d", "e"]}, "input", "at most 4"),
    ({"model": "emb", "input": " ".join(["w"] * 21)}, "input", "at most 20 tokens"),
    ({"model": "emb", "input": "x", "dimensions": 0}, "dimensions", "1..8"),
    ({"model": "emb", "input": "x", "dimensions": 9}, "dimensions", "1..8"),
    ({"model": "emb", "input": "x", "encoding_format": "int8"}, "encoding_format", "Example"),
    ({"model": "emb", "input": {"text": "x"}}, None, "Example"),
])
async def test_embeddings_bad_input_is_400(mgw, body, param, words) -> None:
    err = _openai_error(await mgw.post("/v1/embeddings", json=body), 400)
    assert words in err["message"], err
    if param:
        assert err["param"].startswith(param)


async def test_concurrent_embeddings_merge_and_a_bad_one_fails_alone() -> None:
    """The gateway merges concurrent requests into batch calls (one forward pass each);
    a request that fails its check gets its own 400 and the others their vectors."""
    import asyncio

    models = [{"id": "emb", "modality": "embeddings",
               "engine": {"type": "mock", "dimensions": 8, "max_input_tokens": 20,
                          "delay_ms": 40, "merge_in_flight": 1}}]
    gw = ModalityGateway(models)
    try:
        texts = [f"sentence number {i}" for i in range(12)]
        bodies = [{"model": "emb", "input": t} for t in texts]
        bodies.insert(6, {"model": "emb", "input": " ".join(["w"] * 21)})  # too long
        responses = await asyncio.gather(*(gw.post("/v1/embeddings", json=b) for b in bodies))
        statuses = [r.status_code for r in responses]
        assert statuses == [200] * 6 + [400] + [200] * 6, statuses
        assert "at most 20 tokens" in responses[6].json()["error"]["message"]
        alone = (await gw.post("/v1/embeddings", json=bodies[3])).json()["data"][0]["embedding"]
        assert responses[3].json()["data"][0]["embedding"] == alone  # merged = unmerged
        stats = gw.core.merge_stats()["emb"]
        assert stats["requests"] == 14 and stats["calls"] < 8 and stats["largest"] >= 6, stats
        assert gw.deployments["emb"].largest_batch >= 6  # one engine call for a merged call
        assert sorted(e.status for e in gw.events) == [200] * 13 + [400]
    finally:
        await gw.client.aclose()


async def test_merging_off_sends_one_call_per_request() -> None:
    models = [{"id": "emb", "modality": "embeddings",
               "engine": {"type": "mock", "dimensions": 8, "merge_in_flight": 0}}]
    gw = ModalityGateway(models)
    try:
        r = await gw.post("/v1/embeddings", json={"model": "emb", "input": "x"})
        assert r.status_code == 200 and gw.core.merge_stats() == {}
    finally:
        await gw.client.aclose()


async def test_wrong_modality_names_capability(mgw) -> None:
    err = _openai_error(await mgw.post("/v1/embeddings", json={"model": "mock-fast", "input": "x"}), 400, "model")
    assert "text-generation" in err["message"] and "emb" in err["message"]
    chat = {"model": "emb", "messages": [{"role": "user", "content": "hi"}]}
    err = _openai_error(await mgw.post("/v1/chat/completions", json=chat), 400, "model")
    assert "embeddings model" in err["message"] and "text-generation" in err["message"]
    stream = await mgw.post("/v1/chat/completions", json={**chat, "stream": True})
    _openai_error(stream, 400, "model")
    native = await mgw.post("/inference", json={"model": "img", "prompt": "hi"})
    assert native.status_code == 400 and native.json()["error"]["code"] == "INVALID_REQUEST"
    speech = await mgw.post("/v1/audio/speech", json={"model": "emb", "input": "hi"})
    assert "text-to-speech" in _openai_error(speech, 400, "model")["message"]
    _openai_error(await mgw.post("/v1/embeddings", json={"model": "nope", "input": "x"}), 404)


# ---------------------------------------------------------------------- speech


@pytest.mark.parametrize("fmt", ["mp3", "wav", "opus", "flac", "aac"])
async def test_speech_formats_decode(mgw, fmt) -> None:
    r = await mgw.post("/v1/audio/speech", json={
        "model": "tts", "input": "Hello there. How are you today?", "voice": "alloy", "response_format": fmt})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith({"mp3": "audio/mpeg", "wav": "audio/wav", "opus": "audio/ogg",
                                                  "flac": "audio/flac", "aac": "audio/aac"}[fmt])
    audio = decode_audio(r.content)
    assert 0.28 < audio.size / 16000 < 0.45  # 6 words x 0.05 s; codecs pad a little


async def test_speech_pcm_default_mp3_and_speed(mgw) -> None:
    r = await mgw.post("/v1/audio/speech", json={"model": "tts", "input": "one two", "response_format": "pcm"})
    assert r.status_code == 200 and len(r.content) == 2 * 2 * int(22050 * 0.05)
    fast = await mgw.post("/v1/audio/speech", json={"model": "tts", "input": "one two",
                                                     "response_format": "pcm", "speed": 2.0})
    assert len(fast.content) == 2 * 2 * int(22050 * 0.05 / 2)
    default = await mgw.post("/v1/audio/speech", json={"model": "tts", "input": "one two"})
    assert default.headers["content-type"] == "audio/mpeg"
    assert mgw.events[-1].route == "/v1/audio/speech" and mgw.events[-1].status == 200


@pytest.mark.parametrize("body,param", [
    ({"model": "tts", "input": ""}, "input"),
    ({"model": "tts", "input": "x" * 4097}, "input"),
    ({"model": "tts", "input": "hi", "voice": "darth"}, "voice"),
    ({"model": "tts", "input": "hi", "response_format": "ogg"}, "response_format"),
    ({"model": "tts", "input": "hi", "speed": 5}, "speed"),
    ({"model": "tts"}, "input"),
])
async def test_speech_bad_input_is_400(mgw, body, param) -> None:
    err = _openai_error(await mgw.post("/v1/audio/speech", json=body), 400, param)
    assert err["code"] == "invalid_request"


async def test_voices_list_maps_openai_names(mgw) -> None:
    r = await mgw.get("/v1/audio/voices")
    voices = r.json()["data"][0]["voices"]
    assert {"alloy", "echo", "fable", "onyx", "nova", "shimmer"} <= set(voices)
    assert voices["alloy"] == "mock"


# --------------------------------------------------------------- transcription


@pytest.mark.parametrize("fmt", ["json", "text", "verbose_json", "srt", "vtt"])
async def test_transcription_formats(mgw, fmt) -> None:
    r = await mgw.post("/v1/audio/transcriptions", data={"model": "asr", "response_format": fmt},
                       files={"file": ("a.wav", _wav(2.0), "audio/wav")})
    assert r.status_code == 200, r.text
    if fmt == "json":
        assert r.json()["text"] == "hello from the mock"
    elif fmt == "text":
        assert r.text.strip() == "hello from the mock"
    elif fmt == "verbose_json":
        body = r.json()
        assert body["duration"] == pytest.approx(2.0, abs=0.05)
        assert [s["start"] for s in body["segments"]] == [0.0, pytest.approx(1.0, abs=0.05)]
    elif fmt == "srt":
        assert r.text.startswith("1\n00:00:00,000 --> 00:00:01,000\nhello from")
    else:
        assert r.text.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n")


async def test_transcription_decodes_compressed_input(mgw) -> None:
    t = np.arange(16000) / 16000
    mp3 = encode_audio((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000, "mp3")
    r = await mgw.post("/v1/audio/transcriptions", data={"model": "asr", "response_format": "verbose_json"},
                       files={"file": ("a.mp3", mp3, "audio/mpeg")})
    assert r.status_code == 200 and r.json()["duration"] == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("data,files,param,words", [
    ({"model": "asr"}, {"file": ("x.wav", b"not audio at all" * 20, "audio/wav")}, "file", "not usable audio"),
    ({"model": "asr"}, {"file": ("x.wav", b"", "audio/wav")}, "file", "empty"),
    ({"model": "asr"}, None, "file", "file is required"),
    ({}, {"file": ("x.wav", b"RIFF", "audio/wav")}, "model", "model is required"),
    ({"model": "asr", "response_format": "docx"}, {"file": ("x.wav", b"RIFF", "audio/wav")}, "response_format", "json"),
    ({"model": "asr", "language": "fr"}, {"file": ("x.wav", b"RIFF", "audio/wav")}, "language", "en"),
    ({"model": "mock-fast"}, {"file": ("x.wav", b"RIFF", "audio/wav")}, "model", "speech-to-text"),
])
async def test_transcription_bad_input_is_400(mgw, data, files, param, words) -> None:
    kwargs = {"data": data}
    if files is not None:
        kwargs["files"] = files
    else:
        kwargs["files"] = {"other": ("o.txt", b"x", "text/plain")}
    err = _openai_error(await mgw.post("/v1/audio/transcriptions", **kwargs), 400, param)
    assert words in err["message"], err


async def test_transcription_json_body_and_oversized(mgw) -> None:
    _openai_error(await mgw.post("/v1/audio/transcriptions", json={"model": "asr"}), 400, "file")
    big = await mgw.post("/v1/audio/transcriptions", data={"model": "asr"},
                         files={"file": ("big.wav", b"\0" * 70000, "audio/wav")})
    assert big.status_code == 413


# ----------------------------------------------------------------------- image


async def test_images_png_of_requested_size(mgw) -> None:
    from PIL import Image

    r = await mgw.post("/v1/images/generations", json={"model": "img", "prompt": "a cat", "n": 3, "size": "128x128"})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert len(data) == 3
    for d in data:
        img = Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))
        assert img.format == "PNG" and img.size == (128, 128)
    default = (await mgw.post("/v1/images/generations", json={"prompt": "a cat"})).json()
    assert Image.open(io.BytesIO(base64.b64decode(default["data"][0]["b64_json"]))).size == (64, 64)


@pytest.mark.parametrize("body,param,words", [
    ({"model": "img", "prompt": "x", "response_format": "url"}, "response_format", "b64_json"),
    ({"model": "img", "prompt": "x", "size": "100x100"}, "size", "64x64, 128x128"),
    ({"model": "img", "prompt": "x", "size": "big"}, "size", "256x256"),
    ({"model": "img", "prompt": "x", "n": 11}, "n", "1 to 10"),
    ({"model": "img", "prompt": "x", "n": 0}, "n", "1 to 10"),
    ({"model": "img", "prompt": "  "}, "prompt", "empty"),
    ({"model": "emb", "prompt": "x"}, "model", "image-generation"),
])
async def test_images_bad_input_is_400(mgw, body, param, words) -> None:
    err = _openai_error(await mgw.post("/v1/images/generations", json=body), 400, param)
    assert words in err["message"], err


# ------------------------------------------------------------------ models, load


async def test_models_show_capabilities(mgw) -> None:
    native = {m["id"]: m for m in (await mgw.get("/models")).json()["models"]}
    assert native["emb"]["capabilities"] == ["embeddings"]
    assert native["tts"]["capabilities"][0] == "text-to-speech"
    assert native["asr"]["capabilities"] == ["speech-to-text"]
    assert native["img"]["capabilities"] == ["image-generation"] and native["img"]["sizes"][0] == "64x64"
    assert "text-generation" in native["mock-fast"]["capabilities"]
    assert all(m["loaded"] for m in native.values())
    v1 = {m["id"]: m for m in (await mgw.get("/v1/models")).json()["data"]}
    assert v1["emb"]["capabilities"] == ["embeddings"] and v1["img"]["modality"] == "image"


async def test_unload_then_409_then_load(mgw) -> None:
    r = await mgw.post("/models/emb/unload")
    assert r.status_code == 200 and r.json()["loaded"] is False
    assert r.json()["memory"]["rss_mb_after"] is not None
    assert mgw.deployments["emb"].engine is None  # the engine and its weights are gone
    err = _openai_error(await mgw.post("/v1/embeddings", json={"model": "emb", "input": "x"}), 409)
    assert err["code"] == "model_not_loaded" and "POST /models/emb/load" in err["message"]
    native = {m["id"]: m for m in (await mgw.get("/models")).json()["models"]}
    assert native["emb"]["loaded"] is False and native["tts"]["loaded"] is True
    health = await mgw.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"  # unloaded on purpose
    emb = next(m for m in health.json()["models"] if m["id"] == "emb")
    assert (emb["loaded"], emb["status"]) == (False, "unloaded")
    assert (await mgw.post("/models/emb/load")).json()["loaded"] is True
    assert (await mgw.post("/v1/embeddings", json={"model": "emb", "input": "x"})).status_code == 200


async def test_unload_text_model_and_state_survives_a_new_gateway(mgw) -> None:
    await mgw.post("/models/mock-fast/unload")
    chat = {"model": "mock-fast", "messages": [{"role": "user", "content": "hi"}]}
    r = await mgw.post("/v1/chat/completions", json=chat)
    assert r.status_code == 409
    n = await mgw.post("/inference", json={"model": "mock-fast", "prompt": "hi"})
    assert n.json()["error"]["code"] == "MODEL_NOT_LOADED"
    # a redeploy builds a new gateway over the same persisted state
    again = ModalityGateway()
    again.core.model_state = mgw.state
    await again.core.refresh_model_state()
    assert (await again.post("/v1/chat/completions", json=chat)).status_code == 409
    await mgw.post("/models/mock-fast/load")
    assert (await mgw.post("/v1/chat/completions", json=chat)).status_code == 200
    assert (await mgw.post("/models/nope/unload")).status_code == 404


def test_model_state_actor_persists_to_file(tmp_path) -> None:
    from actors.model_state import ModelStateActor, state_file_for

    path = state_file_for("sqlite:///" + str(tmp_path / "ledger.db").lstrip("/"))
    assert path == str(tmp_path / "model_state.json")
    ModelStateActor(path).set("emb", False)
    assert ModelStateActor(path).get_all() == {"emb": False}
    assert json.loads(open(path).read()) == {"emb": False}


# ----------------------------------------------------------------------- voice


async def test_voice_pipeline_round_trip(mgw) -> None:
    r = await mgw.post("/voice/pipeline?max_tokens=8&voice=nova", content=_wav(1.0),
                       headers={"content-type": "audio/wav"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["transcript"] == "hello from the mock"
    assert len(body["reply"].split()) == 8 and body["usage"]["completion_tokens"] == 8
    assert body["models"] == {"asr": "asr", "llm": "mock-fast", "tts": "tts"}
    audio = decode_audio(base64.b64decode(body["audio"]))
    assert abs(audio.size / 16000 - 8 * 0.05) < 0.05  # the mock voice: 0.05 s per word
    routes = {e.route for e in mgw.events}
    assert routes == {"/voice/pipeline"} and {e.model for e in mgw.events} == {"asr", "mock-fast", "tts"}


@pytest.mark.parametrize("query,content,status,words", [
    ("", b"", 400, "empty"),
    ("", b"definitely not audio" * 50, 400, "not usable audio"),
    ("?llm=emb", b"RIFF", 400, "text-generation"),
    ("?tts=asr", b"RIFF", 400, "text-to-speech"),
    ("?voice=darth", None, 400, "voice"),
])
async def test_voice_pipeline_bad_input(mgw, query, content, status, words) -> None:
    r = await mgw.post("/voice/pipeline" + query, content=_wav(0.5) if content is None else content)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]["message"]

"""config/local.yaml as `make run` serves it: the bundled SmolLM2 behind the real gateway.

Deploys the shipped config's application (under /local on the session's Serve instance,
random port) and talks to it with the official openai client and a WebSocket client.
"""

from __future__ import annotations

from typing import Iterator

import asyncio
import json
import time
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI
from websockets.asyncio.client import connect

pytestmark = pytest.mark.models

CONFIG = Path(__file__).resolve().parents[2] / "config" / "local.yaml"


@pytest.fixture(scope="module")
def local_url(serve_instance: int) -> Iterator[str]:
    from ray import serve

    from serve_app.build.app import build_app

    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    serve.run(build_app(args), name="local", route_prefix="/local")
    url = f"http://127.0.0.1:{serve_instance}/local"
    assert httpx.get(url + "/health", timeout=60).json()["status"] == "ok"
    yield url
    serve.delete("local")  # its replicas' CPUs go back to the next module's app


def active(url: str, model: str) -> int:
    body = httpx.get(url + "/health", timeout=10).json()
    return next(m["active_requests"] for m in body["models"] if m["id"] == model)


def test_openai_client_chats_and_streams_with_smollm2(local_url: str) -> None:
    client = OpenAI(base_url=local_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    assert "smollm2-135m" in [m.id for m in client.models.list()]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    unary = client.chat.completions.create(
        model="smollm2-135m", messages=question, temperature=0, max_tokens=24
    )
    assert "Paris" in unary.choices[0].message.content
    assert unary.usage.prompt_tokens > 10 and unary.usage.completion_tokens >= 2
    chunks = list(client.chat.completions.create(
        model="smollm2-135m", messages=question, temperature=0, max_tokens=24,
        stream=True, stream_options={"include_usage": True},
    ))
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 2
    assert "".join(deltas) == unary.choices[0].message.content  # temperature 0: same text
    assert chunks[-1].usage.completion_tokens == unary.usage.completion_tokens


def test_websocket_cancel_stops_smollm2_mid_generation(local_url: str) -> None:
    async def scenario() -> dict:
        ws_url = local_url.replace("http://", "ws://") + "/ws"
        async with connect(ws_url) as ws:
            await ws.send(json.dumps({
                "type": "inference", "id": "long", "model": "smollm2-135m", "max_tokens": 400,
                "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            }))
            tokens = 0
            while tokens < 3:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 60))
                assert msg["type"] == "token", msg
                tokens += 1
            await ws.send(json.dumps({"type": "cancel", "id": "long"}))
            while True:
                msg = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if msg["type"] in ("complete", "error"):
                    return msg

    assert active(local_url, "smollm2-135m") == 0
    done = asyncio.run(scenario())
    cancelled_at = time.monotonic()
    assert done["type"] == "complete" and done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] < 100  # stopped mid-way, not after 400 tokens
    deadline = cancelled_at + 1.0
    while active(local_url, "smollm2-135m") != 0:
        assert time.monotonic() < deadline, "engine still generating 1 s after cancel"
        time.sleep(0.02)


def test_all_five_bundled_models_serve_their_routes(local_url: str) -> None:
    """`make run`'s config: every bundled model is loaded and answers its OpenAI route."""
    import base64
    import io

    from PIL import Image

    models = {m["id"]: m for m in httpx.get(local_url + "/models", timeout=30).json()["models"]}
    expected = {"smollm2-135m": "text-generation", "all-minilm-l6-v2": "embeddings",
                "piper-joe": "text-to-speech", "whisper-tiny-en": "speech-to-text",
                "dcgan-faces": "image-generation"}
    for model_id, capability in expected.items():
        assert models[model_id]["loaded"] is True, models[model_id]
        assert capability in models[model_id]["capabilities"]
    assert "does NOT follow text" in models["dcgan-faces"]["description"]
    client = OpenAI(base_url=local_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    emb = client.embeddings.create(model="all-minilm-l6-v2", input=["a cat", "a kitten"])
    assert len(emb.data[0].embedding) == 384
    speech = client.audio.speech.create(model="piper-joe", voice="alloy",
                                        input="Good morning. The weather is sunny today.")
    text = client.audio.transcriptions.create(model="whisper-tiny-en",
                                              file=("speech.mp3", speech.content, "audio/mpeg"))
    assert "morning" in text.text.lower() and "weather" in text.text.lower(), text.text
    img = client.images.generate(model="dcgan-faces", prompt="a face", size="128x128")
    assert Image.open(io.BytesIO(base64.b64decode(img.data[0].b64_json))).size == (128, 128)


def test_voice_pipeline_round_trip_with_bundled_models(local_url: str) -> None:
    """Piper speaks a question; /voice/pipeline hears it (Whisper), SmolLM2 answers, Piper speaks."""
    import base64

    client = OpenAI(base_url=local_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    question = client.audio.speech.create(model="piper-joe", voice="alloy", response_format="wav",
                                          input="What is the capital of France?")
    r = httpx.post(local_url + "/voice/pipeline?llm=smollm2-135m&max_tokens=24", content=question.content,
                   headers={"content-type": "audio/wav"}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert "capital" in body["transcript"].lower() and "france" in body["transcript"].lower()
    assert "Paris" in body["reply"]
    assert body["audio_seconds"] > 0.5 and len(base64.b64decode(body["audio"])) > 20000


def test_responses_and_anthropic_messages_with_smollm2(local_url: str) -> None:
    from anthropic import Anthropic

    question = "What is the capital of France?"
    oai = OpenAI(base_url=local_url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = oai.responses.create(model="smollm2-135m", input=question, temperature=0,
                             max_output_tokens=24)
    assert "Paris" in r.output_text and r.usage.input_tokens > 10
    claude = Anthropic(base_url=local_url, api_key="unused", max_retries=0, timeout=120)
    m = claude.messages.create(model="smollm2-135m", max_tokens=24, extra_body={"temperature": 0},
                               messages=[{"role": "user", "content": question}])
    assert "Paris" in m.content[0].text
    with claude.messages.stream(model="smollm2-135m", max_tokens=24, stop_sequences=["Paris"],
                                extra_body={"temperature": 0},
                                messages=[{"role": "user", "content": question}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert "Paris" not in text and text == m.content[0].text.split("Paris")[0]
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", "Paris")

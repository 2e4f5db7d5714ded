"""The bundled CPU models of the other modalities, through their deployments (no Ray):
MiniLM embeddings, the Piper voice, Whisper tiny.en and the DCGAN, as config/local.yaml
configures them. Each model is loaded once for the module.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio
import yaml

from deployments.audio import decode_audio
from deployments.embeddings import EmbeddingDeployment
from deployments.image import ImageDeployment
from deployments.speech import SpeechDeployment
from deployments.transcription import TranscriptionDeployment
from serve_app.settings import load_settings
from serve_app.errors import InvalidRequest
from serve_app.protocol.modalities import (
    EmbeddingRequest,
    ImageRequest,
    SpeechRequest,
    TranscriptionRequest,
)

pytestmark = [pytest.mark.models, pytest.mark.asyncio(loop_scope="module")]

CONFIG = Path(__file__).resolve().parents[2] / "config" / "local.yaml"
SENTENCE = "The quick brown fox jumps over the lazy dog. Speech recognition works offline."


def _model(modality: str):
    args = yaml.safe_load(CONFIG.read_text())["applications"][0]["args"]
    return next(m for m in load_settings(args).models if m.modality == modality)


async def _started(cls, modality):
    dep = cls(_model(modality))
    await dep.start()
    return dep


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def embedder():
    dep = await _started(EmbeddingDeployment, "embeddings")
    yield dep
    await dep.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def speaker():
    dep = await _started(SpeechDeployment, "speech")
    yield dep
    await dep.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def transcriber():
    dep = await _started(TranscriptionDeployment, "transcription")
    yield dep
    await dep.shutdown()


def _vectors(result) -> list[np.ndarray]:
    return [np.frombuffer(v, dtype="<f4") for v in result.vectors]


async def test_similar_sentences_are_closer_than_unrelated(embedder) -> None:
    r = await embedder.embed(EmbeddingRequest("e", [
        "A man is eating food.", "A man is eating a piece of bread.", "The stock market fell sharply today."]))
    a, b, c = _vectors(r)
    assert r.dimensions == 384 and abs(np.linalg.norm(a) - 1) < 1e-4
    assert a @ b > 0.5 > a @ c
    assert r.prompt_tokens > 15
    # one request alone or inside a batch: the same vector
    alone = _vectors(await embedder.embed(EmbeddingRequest("e", ["A man is eating food."])))[0]
    assert np.allclose(alone, a, atol=1e-5)
    with pytest.raises(InvalidRequest, match="at most 256 tokens"):
        await embedder.embed(EmbeddingRequest("e", ["word " * 400]))


async def _speak(speaker, fmt: str, text: str = SENTENCE) -> tuple[bytes, list]:
    chunks = [c async for c in speaker.synthesize(SpeechRequest("s", text, "alloy", fmt))]
    return b"".join(c.data for c in chunks), chunks


async def test_speech_transcribed_back_contains_its_words(speaker, transcriber) -> None:
    audio, chunks = await _speak(speaker, "mp3")
    assert len([c for c in chunks if c.data]) >= 2  # streamed: one sentence at a time
    assert 3.0 < chunks[-1].audio_seconds < 12.0
    result = await transcriber.transcribe(TranscriptionRequest("t", audio, "speech.mp3"))
    words = set(result.text.lower().replace(".", " ").replace(",", " ").split())
    expected = {"quick", "brown", "fox", "jumps", "lazy", "dog", "recognition", "works", "offline"}
    # Whisper tiny (int8) may mishear a word or two at a sentence start ("speech" -> "teach")
    assert len(expected & words) >= 7, result.text
    assert result.segments and result.segments[0].start < result.segments[-1].end <= result.duration + 0.5
    # verbose_json's decoder figures are Whisper's own, not placeholders
    first = result.segments[0]
    assert len(first.tokens) >= 3 and all(isinstance(t, int) for t in first.tokens)
    assert -3.0 < first.avg_logprob < 0.0 and first.compression_ratio > 0.5
    assert 0.0 <= first.no_speech_prob < 0.5 and first.temperature == 0.0


@pytest.mark.parametrize("fmt", ["wav", "opus", "flac"])
async def test_speech_formats_and_speed(speaker, fmt) -> None:
    audio, _ = await _speak(speaker, fmt, "Hello there, friend.")
    normal = decode_audio(audio).size
    chunks = [c async for c in speaker.synthesize(SpeechRequest("s", "Hello there, friend.", "echo", fmt, 2.0))]
    quick = decode_audio(b"".join(c.data for c in chunks)).size
    assert 0.3 < quick / normal < 0.75  # speed 2 is about half as long


async def test_bad_audio_is_a_400(transcriber) -> None:
    with pytest.raises(InvalidRequest, match="not usable audio"):
        await transcriber.transcribe(TranscriptionRequest("t", b"\x00\x01" * 5000, "noise.wav"))


async def test_gan_image_is_png_of_requested_size() -> None:
    from PIL import Image

    dep = await _started(ImageDeployment, "image")
    try:
        r = await dep.generate(ImageRequest("i", "a smiling face", n=2, width=256, height=256))
        imgs = [Image.open(io.BytesIO(png)) for png in r.images]
        assert [(i.format, i.size) for i in imgs] == [("PNG", (256, 256))] * 2
        assert np.asarray(imgs[0]).std() > 10  # a picture, not a flat colour
        again = await dep.generate(ImageRequest("i", "a smiling face", n=2, width=256, height=256))
        assert again.images == r.images  # the prompt seeds it: same prompt, same faces
        other = await dep.generate(ImageRequest("i", "another prompt", n=1, width=64, height=64))
        assert Image.open(io.BytesIO(other.images[0])).size == (64, 64)
        with pytest.raises(InvalidRequest, match="64x64"):
            await dep.generate(ImageRequest("i", "x", width=300, height=300))
    finally:
        await dep.shutdown()

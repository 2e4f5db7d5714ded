"""A modality engine's failure is INFERENCE_FAILED naming the model and what it was doing
(EngineHost._engine_errors); Troupe errors from an engine pass through unchanged."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest

from deployments.embeddings import EmbeddingDeployment
from deployments.image import ImageDeployment
from deployments.speech import SpeechDeployment
from deployments.transcription import TranscriptionDeployment
from serve_app.errors import InferenceFailed, RateLimitExceeded
from serve_app.protocol.modalities import (
    EmbeddingRequest,
    ImageRequest,
    SpeechRequest,
    TranscriptionRequest,
)


def _wav() -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes((np.sin(np.arange(16000) / 10) * 8000).astype("<i2").tobytes())
    return out.getvalue()


async def _boom(*_: object, **__: object) -> None:
    raise ValueError("engine broke")


async def _speech_boom(*_: object, **__: object):
    yield np.zeros(100, dtype=np.float32)  # some audio first: the failure is mid-stream
    raise ValueError("engine broke")


async def _started(cls, modality: str, **engine):
    dep = cls({"id": "m1", "modality": modality, "engine": {"type": "mock", **engine}})
    await dep.start()
    return dep


async def test_each_modality_names_the_model_and_what_failed() -> None:
    emb = await _started(EmbeddingDeployment, "embeddings")
    emb.engine.embed = _boom
    with pytest.raises(InferenceFailed, match=r"Model 'm1' failed while embedding: ValueError"):
        await emb.embed(EmbeddingRequest("e", ["hi"]))

    img = await _started(ImageDeployment, "image")
    img.engine.generate = _boom
    with pytest.raises(InferenceFailed, match="failed while drawing") as info:
        await img.generate(ImageRequest("i", "a cat"))
    assert info.value.details == {"exception": "ValueError"}

    asr = await _started(TranscriptionDeployment, "transcription")
    asr.engine.transcribe = _boom
    with pytest.raises(InferenceFailed, match="failed while transcribing"):
        await asr.transcribe(TranscriptionRequest("t", _wav(), "a.wav"))

    tts = await _started(SpeechDeployment, "speech")
    tts.engine.synthesize = _speech_boom
    chunks = []
    with pytest.raises(InferenceFailed, match="failed while speaking"):
        async for chunk in tts.synthesize(SpeechRequest("s", "Hello there.", "alloy", "wav")):
            chunks.append(chunk)
    assert tts.stats()["active_requests"] == 0  # counted out despite the failure


async def test_a_troupe_error_from_an_engine_passes_through() -> None:
    emb = await _started(EmbeddingDeployment, "embeddings")

    async def limited(*_: object) -> None:
        raise RateLimitExceeded("provider says slow down")

    emb.engine.embed = limited
    with pytest.raises(RateLimitExceeded, match="slow down"):
        await emb.embed(EmbeddingRequest("e", ["hi"]))

"""Modality engines, deployments and helpers without Ray: adapters against fakes or tiny
models built here, Serve's batching of the embeddings deployment, audio codecs, config."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import types

import numpy as np
import pytest

from deployments.audio import AudioDecodeError, StreamingEncoder, decode_audio, encode_audio
from deployments.embeddings import EmbeddingDeployment
from deployments.engines.modality_base import split_sentences
from deployments.engines.piper_tts import phoneme_ids, restore_punctuation
from serve_app.settings import ConfigError, ModelConfig, load_settings
from serve_app.errors import InvalidRequest
from serve_app.protocol.modalities import EmbeddingRequest


def _embedding_model(**engine) -> ModelConfig:
    return ModelConfig.model_validate(
        {"id": "emb", "modality": "embeddings", "engine": {"type": "mock", "dimensions": 6, **engine}}
    )


# ----------------------------------------------------------------------- config


def test_engine_must_fit_modality_and_error_names_path() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"models": [{"id": "x", "engine": {"type": "mock"}},
                                  {"id": "tts", "modality": "speech", "engine": {"type": "gan"}}]})
    msg = str(info.value)
    assert "models.1" in msg and "engine.type 'gan' serves 'image'" in msg and "piper" in msg
    with pytest.raises(ConfigError) as info:
        load_settings({"models": [{"id": "e", "modality": "embeddings",
                                   "engine": {"type": "mock", "dimension": 3}}]})
    assert "models.0.engine.mock-embeddings.dimension" in str(info.value)
    with pytest.raises(ConfigError, match="models.0.modality"):
        load_settings({"models": [{"id": "v", "modality": "video", "engine": {"type": "mock"}}]})


def test_mock_engine_under_each_modality_and_deployment_names() -> None:
    s = load_settings({"models": [
        {"id": m, "modality": m, "engine": {"type": "mock"}}
        for m in ("text", "embeddings", "speech", "transcription", "image")]})
    assert [m.engine.type for m in s.models] == [
        "mock", "mock-embeddings", "mock-speech", "mock-transcription", "mock-image"]
    assert [m.deployment_name for m in s.models] == [
        "LLM_text", "Embeddings_embeddings", "Speech_speech", "Transcription_transcription", "Image_image"]
    # the dumped form (what Serve passes to replicas) validates again
    assert ModelConfig.model_validate(s.models[1].model_dump(mode="json")) == s.models[1]


def test_shipped_configs_validate() -> None:
    import yaml

    for name in ("local", "mock", "gpu"):
        doc = yaml.safe_load(open(os.path.join("config", f"{name}.yaml")))
        settings = load_settings(doc["applications"][0]["args"])
        assert settings.models


# ---------------------------------------------------------- embeddings batching


async def test_embed_batch_splits_results_per_request() -> None:
    dep = EmbeddingDeployment(_embedding_model())
    reqs = [EmbeddingRequest("a", ["one two", "three"]), EmbeddingRequest("b", [[5, 6, 7]], dimensions=3)]
    out = await dep.embed_batch(reqs)
    assert [len(r.vectors) for r in out] == [2, 1]
    assert [r.prompt_tokens for r in out] == [3, 3]
    assert out[1].dimensions == 3
    v = np.frombuffer(out[1].vectors[0], dtype="<f4")
    assert v.size == 3 and abs(np.linalg.norm(v) - 1) < 1e-5
    alone = (await dep.embed_batch([EmbeddingRequest("c", ["three"])]))[0]
    assert alone.vectors[0] == out[0].vectors[1]  # batching does not change a vector


async def test_one_bad_request_fails_alone() -> None:
    dep = EmbeddingDeployment(_embedding_model())
    with pytest.raises(InvalidRequest):
        await dep.embed(EmbeddingRequest("bad", [""]))
    assert dep.engine.batches == []  # refused before it joined a batch


# -------------------------------------------------------------- vLLM pooling


class _FakeOutput:
    def __init__(self, embedding, ids):
        self.outputs = types.SimpleNamespace(embedding=embedding)
        self.prompt_token_ids = ids


class _FakeTokenizer:
    def encode(self, text):
        return [len(w) for w in text.split()] + [0]


class _FakeLLM:
    """vllm.LLM's pooling surface: LLM(..., runner="pooling"), get_tokenizer(), embed()."""

    instances: list["_FakeLLM"] = []

    def __init__(self, **kwargs):
        assert kwargs["runner"] == "pooling"
        self.kwargs = kwargs
        self.calls: list[list] = []
        _FakeLLM.instances.append(self)

    def get_tokenizer(self):
        return _FakeTokenizer()

    def embed(self, prompts, use_tqdm=True):
        assert use_tqdm is False
        self.calls.append(list(prompts))
        out = []
        for p in prompts:
            ids = p["prompt_token_ids"] if isinstance(p, dict) else _FakeTokenizer().encode(p)
            out.append(_FakeOutput([float(len(ids)), 2.0, 0.0, 0.0], ids))
        return out


async def test_vllm_pooling_adapter_against_fake(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=_FakeLLM))
    model = ModelConfig.model_validate({"id": "gte", "modality": "embeddings", "engine": {
        "type": "vllm-pooling", "model": "/models/gte", "max_model_len": 16, "matryoshka": True}})
    dep = EmbeddingDeployment(model)
    await dep.start()
    llm = _FakeLLM.instances[-1]
    assert llm.kwargs["model"] == "/models/gte" and llm.kwargs["max_model_len"] == 16
    assert dep.engine.dimensions == 4
    res = await dep.embed(EmbeddingRequest("r", ["hello big world", [7, 8]], dimensions=2))
    assert llm.calls[-1] == ["hello big world", {"prompt_token_ids": [7, 8]}]
    assert res.prompt_tokens == 4 + 2 and res.dimensions == 2
    v = np.frombuffer(res.vectors[0], dtype="<f4")
    assert np.allclose(v, np.array([4.0, 2.0]) / np.linalg.norm([4.0, 2.0]))
    with pytest.raises(InvalidRequest, match="at most 16 tokens"):
        await dep.embed(EmbeddingRequest("r", [" ".join(["w"] * 17)]))


# ---------------------------------------------------------------- diffusers


def _tiny_pipeline(path: str) -> None:
    """A randomly initialised Stable Diffusion pipeline of a few kB, saved to ``path``."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
        norm_num_groups=4, attention_head_dim=2)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                        down_block_types=("DownEncoderBlock2D",), up_block_types=("UpDecoderBlock2D",),
                        norm_num_groups=4, layers_per_block=1)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=100, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    tok_dir = os.path.join(path, "_tok")
    os.makedirs(tok_dir)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for i, c in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[c], vocab[c + "</w>"] = 2 + i, 30 + i
    json.dump(vocab, open(os.path.join(tok_dir, "vocab.json"), "w"))
    open(os.path.join(tok_dir, "merges.txt"), "w").write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                              model_max_length=16)
    StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text, tokenizer=tokenizer, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    ).save_pretrained(os.path.join(path, "pipe"))


async def test_diffusers_adapter_with_tiny_random_pipeline(tmp_path) -> None:
    pytest.importorskip("diffusers")
    from PIL import Image
    import io

    from deployments.image import ImageDeployment
    from serve_app.protocol.modalities import ImageRequest

    _tiny_pipeline(str(tmp_path))
    model = ModelConfig.model_validate({"id": "sd-tiny", "modality": "image", "engine": {
        "type": "diffusers", "model": str(tmp_path / "pipe"), "device": "cpu", "dtype": "float32",
        "num_inference_steps": 2, "sizes": ["32x32"]}})
    dep = ImageDeployment(model)
    await dep.start()
    a = await dep.generate(ImageRequest("r", "a red cat", n=2, width=32, height=32, seed=1))
    b = await dep.generate(ImageRequest("r", "a red cat", n=2, width=32, height=32, seed=1))
    assert len(a.images) == 2 and a.images == b.images  # seeded: reproducible
    assert Image.open(io.BytesIO(a.images[0])).size == (32, 32)
    with pytest.raises(InvalidRequest, match="32x32"):
        await dep.generate(ImageRequest("r", "x", width=64, height=64))


# ------------------------------------------------------------------ speech bits


def test_piper_phoneme_ids_and_punctuation() -> None:
    id_map = {"_": [0], "^": [1], "$": [2], " ": [3], ",": [8], ".": [10], "?": [13], "h": [20], "i": [21]}
    assert phoneme_ids("hi.", id_map) == [1, 0, 20, 0, 21, 0, 10, 0, 2]
    assert restore_punctuation("Hello world, how are you?", ["həlˈoʊ wˈɜːld", "hˈaʊ ɑːɹ juː"]) == \
        "həlˈoʊ wˈɜːld, hˈaʊ ɑːɹ juː?"
    assert restore_punctuation("no marks", ["noʊ mɑːɹks"]) == "noʊ mɑːɹks."


def test_split_sentences() -> None:
    assert split_sentences("One. Two? Three!\nFour") == ["One.", "Two?", "Three!", "Four"]
    long = "word, " * 200
    parts = split_sentences(long, max_chars=100)
    assert all(len(p) <= 100 for p in parts) and "".join(parts).count("word") == 200


def test_audio_roundtrip_and_undecodable() -> None:
    sr = 22050
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr)).astype(np.float32)
    for fmt in ("wav", "mp3", "opus", "flac"):
        enc = StreamingEncoder(fmt, sr)
        data = enc.add(x[: sr // 2]) + enc.add(x[sr // 2:]) + enc.finish()
        y = decode_audio(data)
        assert abs(y.size / 16000 - 1.0) < 0.1, fmt
        assert 0.2 < float(np.abs(y).max()) < 0.4, fmt
    assert encode_audio(x, sr, "wav")[:4] == b"RIFF"
    for bad in (b"", b"\x00" * 1000, b"RIFF1234WAVEjunk"):
        with pytest.raises(AudioDecodeError):
            decode_audio(bad)
    with pytest.raises(AudioDecodeError, match="longer than"):
        decode_audio(encode_audio(x, sr, "flac"), max_seconds=0.5)

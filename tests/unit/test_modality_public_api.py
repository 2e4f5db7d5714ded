"""The modality modules import cleanly, export what __all__ says, and stay light."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC = [
    "serve_app.settings.modality",
    "serve_app.gateway.modalities",
    "serve_app.build.replicas",
    "serve_app.build.actors",
    "serve_app.gateway.voice",
    "serve_app.gateway.dispatch",
    "serve_app.gateway.model_state",
    "serve_app.routes.voice",
    "serve_app.store.location",
    "serve_app.cli.serve_config",
    "actors.placement",
    "deployments.engines.registry",
    "serve_app.protocol.modalities",
    "serve_app.protocol.modalities_api",
    "serve_app.routes.modalities",
    "actors.model_state",
    "deployments.audio",
    "deployments.lifecycle",
    "deployments.embeddings",
    "deployments.speech",
    "deployments.transcription",
    "deployments.image",
    "deployments.engines.modality_base",
    "deployments.engines.mock_modalities",
    "deployments.engines.sentence_transformers_engine",
    "deployments.engines.piper_tts",
    "deployments.engines.whisper_asr",
    "deployments.engines.gan_image",
    "deployments.engines.vllm_pooling",
    "deployments.engines.diffusers_image",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_module_exports_what_all_says(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__, name
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"


def test_gateway_and_mock_modality_path_import_no_model_libraries() -> None:
    code = (
        "import sys\n"
        "import serve_app.build.app, serve_app.build.replicas, deployments.engines.mock_modalities\n"
        "import deployments.embeddings, deployments.speech, deployments.transcription, deployments.image\n"
        "import deployments.engines.vllm_pooling, deployments.engines.diffusers_image\n"
        "bad = [m for m in ('torch', 'vllm', 'diffusers', 'av', 'onnxruntime', 'faster_whisper',\n"
        "                   'sentence_transformers', 'PIL') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

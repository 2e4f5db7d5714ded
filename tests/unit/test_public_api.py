"""The public modules import cleanly, export what __all__ says, and stay light."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC = [
    "serve_app.settings",
    "serve_app.errors",
    "serve_app.gateway.core",
    "serve_app.http.plumbing",
    "serve_app.build.app",
    "serve_app.cli.main",
    "serve_app.protocol.internal",
    "serve_app.protocol.openai",
    "serve_app.protocol.native",
    "serve_app.routes.openai_api",
    "serve_app.routes.native",
    "serve_app.routes.websocket",
    "serve_app.protocol.metrics",
    "serve_app.store",
    "serve_app.store.base",
    "serve_app.store.rows",
    "serve_app.store.sqlite",
    "serve_app.store.postgres",
    "serve_app.pricing",
    "serve_app.gateway.metering",
    "serve_app.tracing",
    "serve_app.http.sse",
    "serve_app.cli.status",
    "serve_app.routes.observability",
    "actors.names",
    "actors.metrics",
    "actors.recorder",
    "actors.traces",
    "deployments.llm",
    "deployments.engines.base",
    "deployments.engines.mock",
    "deployments.engines.vllm_engine",
    "deployments.engines.transformers_cpu",
    "deployments.engines.gguf_cache",
    "deployments.engines.stop_strings",
    "deployments.engines.remote",
    "deployments.engines.remote.openai",
    "deployments.engines.remote.anthropic",
    "deployments.engines.remote.gemini",
    "deployments.engines.remote.engine",
    "deployments.engines.remote.retry",
    "deployments.engines.remote.transport",
    "deployments.engines.remote.stream",
    "deployments.engines.remote.errors",
    "deployments.engines.remote.sse",
    "deployments.engines.remote.breaker",
    "actors.session",
    "serve_app.gateway.deadline",
    "serve_app.http.admin_auth",
    "serve_app.build.local_handle",
    "serve_app.routes.admin",
]


@pytest.mark.parametrize("name", PUBLIC)
def test_module_exports_what_all_says(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__all__, name
    missing = [n for n in module.__all__ if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"


def test_gateway_and_mock_path_import_neither_torch_nor_vllm_nor_ray() -> None:
    code = (
        "import sys\n"
        "import serve_app.build.app, serve_app.gateway.core, deployments.llm, deployments.engines.mock\n"
        "import deployments.engines.vllm_engine\n"
        "bad = [m for m in ('torch', 'vllm', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_protocol_modules_import_neither_ray_nor_torch() -> None:
    code = (
        "import sys\n"
        "import serve_app.protocol.internal, serve_app.protocol.openai, serve_app.protocol.native\n"
        "import serve_app.settings, serve_app.errors\n"
        "bad = [m for m in ('torch', 'ray', 'vllm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)

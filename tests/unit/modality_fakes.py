"""An in-process gateway with text and modality deployments behind generic fake handles.

``GenericHandle`` keeps the parts of Ray's handle contract the gateway relies on for any
method: ``handle.<method>.remote(...)`` returns at once, arguments, results and errors
cross pickled, and ``options(stream=True)`` streams an async generator method.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, AsyncIterator

import httpx
import pytest

from deployments.embeddings import EmbeddingDeployment
from deployments.image import ImageDeployment
from deployments.llm import LLMDeployment
from deployments.speech import SpeechDeployment
from deployments.transcription import TranscriptionDeployment
from serve_app.build.app import build_fastapi_app
from serve_app.settings import load_settings
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.model_state import MemoryModelState
from tests.unit.gateway_fakes import (
    REQUEST_DEADLINE_S,
    FakeResponse,
    FakeResponseGenerator,
    _over_the_wire,
)

MODALITY_MODELS = [
    {"id": "mock-fast", "engine": {"type": "mock", "token_delay_ms": 0}, "default_max_tokens": 16},
    {"id": "emb", "modality": "embeddings",
     "engine": {"type": "mock", "dimensions": 8, "max_input_tokens": 20, "max_inputs": 4}},
    {"id": "tts", "modality": "speech", "engine": {"type": "mock"}},
    {"id": "asr", "modality": "transcription",
     "engine": {"type": "mock", "text": "hello from the mock"}},
    {"id": "img", "modality": "image", "engine": {"type": "mock"}},
]

_CLASSES = {
    "embeddings": EmbeddingDeployment,
    "speech": SpeechDeployment,
    "transcription": TranscriptionDeployment,
    "image": ImageDeployment,
}


class _Method:
    def __init__(self, call: Any) -> None:
        self.remote = call


class GenericHandle:
    """A handle over any plain deployment object (unary methods and async generators)."""

    def __init__(self, target: Any, stream: bool = False) -> None:
        self.target = target
        self._stream = stream
        self.responses: list[Any] = []

    def options(self, *, stream: bool = False) -> "GenericHandle":
        h = GenericHandle(self.target, stream)
        h.responses = self.responses
        return h

    def __getattr__(self, name: str) -> _Method:
        fn = getattr(self.target, name)

        if self._stream:
            def call_stream(*args: Any) -> Any:
                gen = fn(*_over_the_wire(args))
                r = FakeResponseGenerator(gen)
                self.responses.append(r)
                return r

            return _Method(call_stream)

        async def run(*args: Any) -> Any:
            try:
                out = fn(*args)
                if inspect.isawaitable(out):
                    out = await out
                return _over_the_wire(out)
            except Exception as exc:
                raise _over_the_wire(exc) from None

        def call(*args: Any) -> Any:
            r = FakeResponse(run(*_over_the_wire(args)))
            self.responses.append(r)
            return r

        return _Method(call)


class ModalityGateway:
    def __init__(self, models: list[dict[str, Any]] = MODALITY_MODELS, **gateway: Any) -> None:
        self.settings = load_settings({"models": models, "gateway": {"max_body_bytes": 65536, **gateway}})
        self.deployments: dict[str, Any] = {}
        for m in self.settings.models:
            if m.modality == "text":
                self.deployments[m.id] = LLMDeployment(m)
            else:
                self.deployments[m.id] = _CLASSES[m.modality](m)
        self.handles = {mid: GenericHandle(d) for mid, d in self.deployments.items()}
        self.state = MemoryModelState()
        self.events: list[Any] = []
        self.core = GatewayCore(self.settings, self.handles, record=self.events.append,
                                model_state=self.state)
        self.app = build_fastapi_app(self.core)
        self.client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                        base_url="http://troupe.test")

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        async with asyncio.timeout(REQUEST_DEADLINE_S):
            return await self.client.post(url, **kwargs)

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        async with asyncio.timeout(REQUEST_DEADLINE_S):
            return await self.client.get(url, **kwargs)


@pytest.fixture
async def mgw() -> AsyncIterator[ModalityGateway]:
    gateway = ModalityGateway()
    try:
        yield gateway
    finally:
        await gateway.client.aclose()

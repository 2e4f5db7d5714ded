"""The text engine interface and the registry that builds engines from config.

An engine turns a :class:`~serve_app.protocol.internal.GenerationRequest` into an async
stream of :class:`~serve_app.protocol.internal.EngineOutput` deltas, following vLLM's
streaming contract:

* each output is a delta; a delta may carry several tokens (``num_tokens``) when the
  consumer lags behind the engine; the engine never slows down to wait for the consumer;
* the last output has ``finish_reason`` ``"stop"`` or ``"length"``;
* closing the async generator (``aclose()``, or cancelling the task iterating it) aborts
  the request: the engine stops generating within a bounded time and frees its slot, so
  ``active_requests()`` drops. ``abort(request_id)`` does the same from outside.

Adding an engine means adding a module and one entry in ``_ENGINE_MODULES``; no route
and no deployment changes.
"""

from __future__ import annotations

import importlib
from typing import AsyncIterator, Protocol, runtime_checkable

from serve_app.config import EngineConfig
from serve_app.protocol.internal import EngineOutput, GenerationRequest

__all__ = ["TextEngine", "create_text_engine", "ENGINE_KINDS"]


@runtime_checkable
class TextEngine(Protocol):
    """What a text model deployment needs from an engine."""

    #: Prompt + completion token limit.
    context_length: int

    async def start(self) -> None:
        """Load weights / start background loops. Called once per replica."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[EngineOutput]:
        """Stream deltas for one request (see the module docstring for the contract)."""

    async def abort(self, request_id: str) -> None:
        """Stop a running request; a no-op when it already finished."""

    def active_requests(self) -> int:
        """Requests the engine is working on right now (engine-side truth)."""

    async def shutdown(self) -> None:
        """Free resources; called when the replica stops."""


# engine kind -> "module:Class"; modules are imported only when configured, so the CPU
# install never imports vllm and the mock never imports torch.
_ENGINE_MODULES: dict[str, str] = {
    "mock": "deployments.engines.mock:MockTextEngine",
    "transformers": "deployments.engines.transformers_cpu:TransformersTextEngine",
    "vllm": "deployments.engines.vllm_engine:VLLMTextEngine",
    "openai": "deployments.engines.remote_openai:OpenAITextEngine",
}
ENGINE_KINDS = tuple(_ENGINE_MODULES)


def create_text_engine(model_id: str, config: EngineConfig) -> TextEngine:
    """Instantiate (not start) the engine a model's config names."""
    module_name, class_name = _ENGINE_MODULES[config.type].split(":")
    engine_cls = getattr(importlib.import_module(module_name), class_name)
    return engine_cls(model_id=model_id, config=config)

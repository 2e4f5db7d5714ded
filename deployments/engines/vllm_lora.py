"""LoRA adapters on the vLLM engine: ``enable_lora`` at start, ``add_lora`` / ``remove_lora``
as the replica's multiplexer loads and evicts, and a ``LoRARequest`` on each request.

vLLM batches sequences of different adapters in one step (up to ``max_loras`` adapters per
batch, with its punica kernels), so no grouping is needed here.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Optional

from serve_app.errors import AdapterInvalid, ModelNotLoaded
from serve_app.protocol.internal import GenerationRequest
from serve_app.settings import VLLMEngineConfig

__all__ = ["VLLMAdapters", "VLLM_LORA_RANKS", "LoRAMethods", "lora_engine_args", "lora_rank_slot"]

#: LoRA ranks vLLM can reserve room for (its ``max_lora_rank`` choices).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_slot(rank: int) -> int:
    """The smallest rank vLLM supports that holds ``rank``."""
    return next(r for r in VLLM_LORA_RANKS if r >= rank)


def lora_engine_args(config: VLLMEngineConfig) -> dict[str, Any]:
    """``AsyncEngineArgs`` that turn LoRA on (none when the model serves no adapters)."""
    if config.max_loras is None:
        return {}
    return {"enable_lora": True, "max_loras": config.max_loras,
            "max_lora_rank": lora_rank_slot(config.max_lora_rank)}


class VLLMAdapters:
    """The adapters one vLLM engine holds.

    Args:
        model_id: the model's id (for messages).
        enabled: the engine started with ``enable_lora``.
        request_factory: builds ``LoRARequest(lora_name, lora_int_id, lora_path)``; None:
            vLLM's own, bound by :meth:`bind_vllm`.
    """

    def __init__(self, model_id: str, enabled: bool, request_factory: Optional[Callable[..., Any]]) -> None:
        self.model_id = model_id
        self.enabled = enabled
        self._factory = request_factory
        self.loras: dict[str, Any] = {}
        self._ids = itertools.count(1)  # vLLM's lora_int_id: unique per engine, never 0

    def bind_vllm(self) -> None:
        """Use vLLM's LoRARequest (when LoRA is on) unless a test injected one."""
        if self._factory is None and self.enabled:
            from vllm.lora.request import LoRARequest

            self._factory = LoRARequest

    async def load(self, engine: Any, adapter_id: str, path: str) -> None:
        """``add_lora`` (a no-op when already loaded).

        Raises:
            AdapterInvalid: LoRA is off for this model, or vLLM refused the adapter
                (missing files, rank above max_lora_rank, modules it cannot target).
        """
        if engine is None:
            raise ModelNotLoaded(f"Model {self.model_id!r} is not loaded on this replica.")
        if not self.enabled:
            raise AdapterInvalid(
                f"Model {self.model_id!r} runs vLLM without LoRA; list adapters in its config "
                "(adapters:) so the engine starts with enable_lora.", param="model",
            )
        if adapter_id in self.loras:
            return
        assert self._factory is not None, "bind_vllm() runs at engine start"
        lora = self._factory(lora_name=adapter_id, lora_int_id=next(self._ids), lora_path=path)
        try:
            await engine.add_lora(lora)
        except (ValueError, RuntimeError, OSError) as exc:
            raise AdapterInvalid(
                f"vLLM could not load adapter {adapter_id!r} on model {self.model_id!r}: {exc}",
                param="model", details={"adapter": adapter_id},
            ) from None
        self.loras[adapter_id] = lora

    async def unload(self, engine: Any, adapter_id: str) -> None:
        """``remove_lora``: frees its slot in vLLM's LoRA cache."""
        lora = self.loras.pop(adapter_id, None)
        if lora is not None and engine is not None:
            await engine.remove_lora(lora.lora_int_id)

    def request_kwargs(self, request: GenerationRequest) -> dict[str, Any]:
        """``AsyncLLM.generate`` keyword arguments for the request's adapter (none: base)."""
        lora = self.for_request(request)
        return {} if lora is None else {"lora_request": lora}

    def for_request(self, request: GenerationRequest) -> Any:
        """The request's LoRARequest (None: the base model)."""
        if request.adapter is None:
            return None
        lora = self.loras.get(request.adapter)
        if lora is None:
            raise AdapterInvalid(
                f"Adapter {request.adapter!r} is not loaded on this replica of {self.model_id!r}.",
                param="model",
            )
        return lora


class LoRAMethods:
    """The engine's adapter methods (``load_adapter``/``unload_adapter``, which the replica's
    :class:`deployments.adapters.AdapterSlots` calls) over its ``lora`` and ``_engine``."""

    lora: VLLMAdapters
    _engine: Any

    async def load_adapter(self, adapter_id: str, path: str) -> None:
        """Add a LoRA adapter to vLLM."""
        await self.lora.load(self._engine, adapter_id, path)

    async def unload_adapter(self, adapter_id: str) -> None:
        await self.lora.unload(self._engine, adapter_id)

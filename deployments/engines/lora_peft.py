"""LoRA adapters on the CPU text engine's model, with ``peft``.

The first adapter wraps the model in a ``PeftModel`` (LoRA layers injected in place); later
ones are added with ``load_adapter`` and removed with ``delete_adapter``. Generation always
names its adapter per sequence with peft's ``adapter_names`` (``"__base__"`` for the plain
model), so no global "active adapter" state is shared between requests, and one batch
may mix sequences with different adapters (peft splits the LoRA part of each layer by
adapter; the base matmuls stay shared).

Every PeftAdapters method mutates or reads the model: call them on the batch loop's thread.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

from serve_app.errors import AdapterInvalid, ModelNotLoaded

__all__ = ["PeftAdapters", "PeftAdapterMethods", "BASE_ADAPTER"]

#: peft's name for "no adapter" in a mixed batch.
BASE_ADAPTER = "__base__"


class PeftAdapters:
    """The adapters loaded on one model.

    Args:
        model: the base transformers model (already on its device, in eval mode).
    """

    def __init__(self, model: Any) -> None:
        self.base = model
        self.peft: Optional[Any] = None
        self.loaded: set[str] = set()

    def load(self, adapter_id: str, path: str) -> None:
        """Load the adapter in ``path`` under ``adapter_id`` (no-op when already loaded).

        Raises:
            AdapterInvalid: peft could not apply it to this model (e.g. its target modules
                are not in this architecture, or its shapes do not match).
        """
        if adapter_id in self.loaded:
            return
        try:
            if self.peft is None:
                from peft import PeftModel

                self.peft = PeftModel.from_pretrained(
                    self.base, path, adapter_name=adapter_id, is_trainable=False
                )
                self.peft.eval()
            else:
                self.peft.load_adapter(path, adapter_name=adapter_id, is_trainable=False)
        except (ValueError, RuntimeError, KeyError, OSError) as exc:
            raise AdapterInvalid(
                f"Adapter {adapter_id!r} could not be applied to this model: {exc}",
                param="model", details={"adapter": adapter_id},
            ) from None
        self.loaded.add(adapter_id)

    def unload(self, adapter_id: str) -> None:
        """Free the adapter's weights (the LoRA layers of the others stay)."""
        if adapter_id not in self.loaded or self.peft is None:
            return
        self.peft.delete_adapter(adapter_id)
        self.loaded.discard(adapter_id)

    def generate_target(self, adapters: list[Optional[str]]) -> tuple[Any, dict[str, Any]]:
        """The model to call ``generate``/``forward`` on and its extra keyword arguments for
        a batch whose rows use ``adapters`` (None: the base model)."""
        if self.peft is None:
            return self.base, {}
        return self.peft, {"adapter_names": [a or BASE_ADAPTER for a in adapters]}


class PeftAdapterMethods:
    """The transformers engine's adapter methods (``load_adapter``/``unload_adapter``, which
    the replica's :class:`deployments.adapters.AdapterSlots` calls).

    Loads and unloads run on the batch loop's thread between two steps, so a change to the
    model never races a forward; the loop's stepper (a ``RaggedModel``) then runs each
    sequence of a step with its own adapter.
    """

    model_id: str
    _model: Any
    _loop: Any
    _closed: bool
    _lora: Optional[PeftAdapters] = None

    async def _between_steps(self, fn: Callable[[], Any]) -> Any:
        if self._loop is None or self._closed:
            raise ModelNotLoaded(f"Model {self.model_id!r} is not loaded on this replica.")
        return await asyncio.wrap_future(self._loop.run_between_steps(fn))

    async def load_adapter(self, adapter_id: str, path: str) -> None:
        """Load a PEFT LoRA adapter under ``adapter_id``."""
        await self._between_steps(lambda: self._peft().load(adapter_id, path))

    async def unload_adapter(self, adapter_id: str) -> None:
        if self._lora is not None:
            await self._between_steps(lambda: self._peft().unload(adapter_id))

    def _peft(self) -> PeftAdapters:
        """The model's adapters, made (and handed to the stepper) on the first load."""
        if self._lora is None:
            self._lora = PeftAdapters(self._model)
            stepper: Any = self._loop.stepper if self._loop is not None else None
            if hasattr(stepper, "lora"):  # a RaggedModel (test fakes have no adapters)
                stepper.lora = self._lora
        return self._lora

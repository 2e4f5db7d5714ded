"""LoRA adapters of one text model: where they live and how many a replica keeps loaded.

An adapter is selected with ``model: "<base>:<adapter>"`` or with the adapter's own id.
Replicas load adapters on first use (Serve's model multiplexing routes a request to a
replica that already holds its adapter) and evict the least recently used one beyond
``max_loaded``.
"""

from __future__ import annotations

import re
from typing import Optional

from pydantic import Field, field_validator, model_validator

from serve_app.settings.base import Strict

__all__ = ["AdapterSettings", "ADAPTER_ID_PATTERN"]

#: Adapter ids: no ":" (it separates base and adapter) and nothing a URL path would split.
ADAPTER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ID_RE = re.compile(ADAPTER_ID_PATTERN)


class AdapterSettings(Strict):
    """LoRA adapters served on top of one text model (local and vLLM engines)."""

    paths: dict[str, str] = Field(
        default_factory=dict,
        description="Adapter id -> local folder holding a PEFT adapter "
        "(adapter_config.json + adapter_model.safetensors).",
    )
    folder: Optional[str] = Field(
        None,
        description="A folder scanned at start: each sub-folder holding an "
        "adapter_config.json becomes an adapter named after the sub-folder.",
    )
    max_loaded: int = Field(
        2, ge=1, le=64,
        description="Adapters one replica keeps loaded (Serve's max_num_models_per_replica); "
        "the least recently used one is evicted beyond it. vLLM's max_loras follows it.",
    )
    max_rank: int = Field(
        64, ge=1, le=512,
        description="Largest LoRA rank accepted; a bigger adapter is refused with a 400 "
        "(vLLM's max_lora_rank follows it).",
    )
    preload: list[str] = Field(
        default_factory=list,
        description="Adapter ids every replica loads at start; none by default.",
    )
    base_names: list[str] = Field(
        default_factory=list,
        description="Names an adapter's base_model_name_or_path may carry to count as "
        "trained on this model (besides the model id and the engine's model path). An "
        "adapter naming another base is refused.",
    )

    @field_validator("paths")
    @classmethod
    def _ids(cls, paths: dict[str, str]) -> dict[str, str]:
        for adapter_id in paths:
            if not _ID_RE.match(adapter_id):
                raise ValueError(
                    f"adapter id {adapter_id!r} must match {ADAPTER_ID_PATTERN} "
                    "(letters, digits, '.', '_', '-'; no ':'), e.g. 'support-bot'"
                )
        return paths

    @model_validator(mode="after")
    def _preload_known(self) -> "AdapterSettings":
        if len(self.preload) > self.max_loaded:
            raise ValueError(
                f"preload lists {len(self.preload)} adapters but max_loaded is {self.max_loaded}"
            )
        unknown = [a for a in self.preload if a not in self.paths]
        if unknown and self.folder is None:
            raise ValueError(f"preload names adapters not in paths: {unknown}")
        return self

"""Reading a PEFT LoRA adapter folder without loading it: its rank, modules and base model.

Used twice: by the gateway when an adapter is registered (a bad adapter is a 400 then,
not a failed request later) and by the engines before they load one. Imports neither Ray
nor torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional

from deployments.engines.gguf_cache import BUNDLED_GGUF, cache_name_for
from serve_app.errors import AdapterInvalid
from serve_app.settings import ModelConfig, TransformersEngineConfig, VLLMEngineConfig

__all__ = ["AdapterInfo", "base_names", "inspect_adapter", "scan_adapter_folder", "WEIGHT_FILES"]

#: The bundled CPU text model's name (adapters trained on it name it as their base).
BUNDLED_TEXT_MODEL = "SmolLM2-135M-Instruct"

#: File names PEFT saves adapter weights under (safetensors first, the pickle format after).
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")

_EXAMPLE = (
    "A PEFT adapter folder holds adapter_config.json and adapter_model.safetensors, as "
    "written by peft's model.save_pretrained(folder)."
)


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """What an adapter folder declares."""

    path: str
    rank: int
    base_model: Optional[str]
    target_modules: tuple[str, ...]


def _norm(name: str) -> str:
    return name.rstrip("/").rsplit("/", 1)[-1].lower()


def _read_config(folder: Path, path: str, adapter_id: str) -> dict[str, Any]:
    """The folder's adapter_config.json, once the folder holds a config and weights."""
    config_file = folder / "adapter_config.json"
    if not folder.is_dir() or not config_file.is_file():
        raise AdapterInvalid(
            f"Adapter {adapter_id!r}: {path!r} is not an adapter folder (no "
            f"adapter_config.json there). {_EXAMPLE}",
            param="path", details={"adapter": adapter_id, "path": path},
        )
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        raise AdapterInvalid(
            f"Adapter {adapter_id!r}: {path!r} has no weights ({' or '.join(WEIGHT_FILES)}). "
            f"{_EXAMPLE}",
            param="path", details={"adapter": adapter_id, "path": path},
        )
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise AdapterInvalid(
            f"Adapter {adapter_id!r}: adapter_config.json is not readable JSON ({exc}).",
            param="path", details={"adapter": adapter_id, "path": path},
        ) from None
    return config


def inspect_adapter(
    path: str, max_rank: int, base_names: Iterable[str], adapter_id: str = "adapter"
) -> AdapterInfo:
    """Check an adapter folder and return what it declares.

    Args:
        path: the adapter's local folder.
        max_rank: the largest rank the model accepts.
        base_names: names (or paths) the base model goes by; the adapter's
            ``base_model_name_or_path`` must match one of them by its last path part.
        adapter_id: the adapter's id, for messages.

    Raises:
        AdapterInvalid: missing folder or files, unreadable config, not a LoRA adapter,
            rank above ``max_rank``, or trained on another base model.
    """
    folder = Path(path)
    config = _read_config(folder, path, adapter_id)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterInvalid(
            f"Adapter {adapter_id!r} is a {config.get('peft_type')} adapter; only LoRA "
            "adapters are served.",
            param="path", details={"adapter": adapter_id, "peft_type": config.get("peft_type")},
        )
    rank = int(config.get("r") or 0)
    if rank < 1 or rank > max_rank:
        raise AdapterInvalid(
            f"Adapter {adapter_id!r} has rank {rank}, but this model accepts ranks 1..{max_rank} "
            "(adapters.max_rank in the model's config).",
            param="path", details={"adapter": adapter_id, "rank": rank, "max_rank": max_rank},
        )
    base = config.get("base_model_name_or_path")
    names = {_norm(n) for n in base_names if n}
    if base and names and _norm(str(base)) not in names:
        raise AdapterInvalid(
            f"Adapter {adapter_id!r} was trained on {base!r}, not on this model "
            f"(known as {sorted(names)}). Register it on the model it was trained on, or add "
            "the name to adapters.base_names if it is the same weights.",
            param="path", details={"adapter": adapter_id, "base_model": base},
        )
    targets = config.get("target_modules") or ()
    if isinstance(targets, str):
        targets = (targets,)
    return AdapterInfo(str(folder), rank, base, tuple(targets))


def base_names(model: ModelConfig) -> list[str]:
    """Names an adapter's ``base_model_name_or_path`` may carry for ``model`` (a ModelConfig):
    its id, the configured ``adapters.base_names`` and the engine's weights path."""
    names = [model.id, *(model.adapters.base_names if model.adapters else [])]
    engine = model.engine
    if isinstance(engine, VLLMEngineConfig):
        names.append(engine.model)
    elif isinstance(engine, TransformersEngineConfig):
        # An adapter trained on the converted cache folder names that folder as its base.
        if engine.model_path is None:
            names += [BUNDLED_TEXT_MODEL, Path(BUNDLED_GGUF).stem]
        else:
            names.append(engine.model_path)
            if engine.model_path.endswith(".gguf"):
                names.append(cache_name_for(Path(engine.model_path).expanduser()))
    return names


def scan_adapter_folder(folder: str) -> dict[str, str]:
    """Adapter id -> path for every sub-folder of ``folder`` holding an adapter_config.json."""
    root = Path(folder)
    if not root.is_dir():
        return {}
    return {
        child.name: str(child)
        for child in sorted(root.iterdir())
        if child.is_dir() and (child / "adapter_config.json").is_file()
    }

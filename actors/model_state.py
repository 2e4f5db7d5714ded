"""ModelStateActor: which configured models are unloaded, kept across redeploys.

A plain class (no Ray here); the gateway applies ``ray.remote`` with the name
``troupe-model-state`` (detached, restartable). The state is also written to a small
JSON file beside the ledger, so it survives a restart of the actor or of Ray.
"""

from __future__ import annotations

import json
import os
from typing import Optional

__all__ = ["ModelStateActor", "MODEL_STATE_ACTOR", "state_file_for"]

MODEL_STATE_ACTOR = "troupe-model-state"


def state_file_for(store_url: str) -> str:
    """``model_state.json`` beside a SQLite ledger, else in $TROUPE_STATE_DIR."""
    if store_url.startswith("sqlite:///"):
        return os.path.join(os.path.dirname("/" + store_url[len("sqlite:///"):].lstrip("/")),
                            "model_state.json")
    base = os.environ.get("TROUPE_STATE_DIR") or os.path.expanduser("~/.local/share/troupe")
    return os.path.join(base, "model_state.json")


class ModelStateActor:
    """model id -> loaded (only models ever unloaded are listed)."""

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path
        self.state: dict[str, bool] = {}
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    loaded = json.load(f)
                self.state = {str(k): bool(v) for k, v in loaded.items()}
            except (OSError, ValueError):
                self.state = {}

    def get_all(self) -> dict[str, bool]:
        return dict(self.state)

    def set(self, model_id: str, loaded: bool) -> None:
        self.state[model_id] = loaded
        if self.path:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.state, f)
            os.replace(tmp, self.path)  # atomic: a crash leaves the old file or the new one

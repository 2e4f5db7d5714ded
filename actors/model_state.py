"""ModelStateActor: which configured models are unloaded, kept across redeploys.

A plain class (no Ray here); the builder (``serve_app.build.actors``) applies
``ray.remote`` with the name ``troupe-model-state`` (detached, restartable). The state is
also written to a small JSON file in the app's state folder (beside its SQLite ledger,
see ``serve_app.store.location``), so it survives a restart of the actor or of Ray.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from serve_app.store.location import state_root

__all__ = ["ModelStateActor", "MODEL_STATE_ACTOR", "state_file_for"]

MODEL_STATE_ACTOR = "troupe-model-state"


def state_file_for(store_url: str) -> str:
    """``model_state.json`` beside a SQLite ledger, else in $TROUPE_STATE_DIR."""
    if store_url.startswith("sqlite:///"):
        return os.path.join(os.path.dirname("/" + store_url[len("sqlite:///"):].lstrip("/")),
                            "model_state.json")
    return os.path.join(state_root(), "model_state.json")


def _read(path: Optional[str]) -> dict[str, bool]:
    if path and os.path.exists(path):
        try:
            with open(path) as f:
                return {str(k): bool(v) for k, v in json.load(f).items()}
        except (OSError, ValueError, AttributeError):
            pass
    return {}


class ModelStateActor:
    """model id -> loaded (only models ever unloaded are listed), per state file.

    ``path``: the state file of the app that created the actor. The actor is one per Ray
    cluster (by name), so each caller may name its own app's file (``path`` in
    ``get_all``/``set``): two Troupe apps on one cluster keep their own load state.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path
        self._states: dict[Optional[str], dict[str, bool]] = {path: _read(path)}

    @property
    def state(self) -> dict[str, bool]:
        return self._state(None)

    def _state(self, path: Optional[str]) -> dict[str, bool]:
        path = path or self.path
        if path not in self._states:
            self._states[path] = _read(path)
        return self._states[path]

    def get_all(self, path: Optional[str] = None) -> dict[str, bool]:
        return dict(self._state(path))

    def set(self, model_id: str, loaded: bool, path: Optional[str] = None) -> None:
        state = self._state(path)
        state[model_id] = loaded
        path = path or self.path
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(state, f)
            os.replace(tmp, path)  # atomic: a crash leaves the old file or the new one

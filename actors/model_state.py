"""ModelStateActor: which configured models are unloaded, kept across redeploys.

A plain class (no Ray here); the builder (``serve_app.build.actors``) applies
``ray.remote`` with the name ``troupe-model-state`` (detached, restartable). The state is
also written to a small JSON file in the app's state folder (beside its SQLite ledger,
see ``serve_app.store.location``), so it survives a restart of the actor or of Ray.

Gateway replicas follow the state with :meth:`ModelStateActor.watch`, a long poll that
answers as soon as the state changes: an idle gateway makes one call a minute instead of
polling every two seconds, and an unload reaches every replica at once.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
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
    ``get_all``/``set``/``watch``): two Troupe apps on one cluster keep their own load state.
    """

    def __init__(self, path: Optional[str] = None) -> None:
        self.path = path
        self._states: dict[Optional[str], dict[str, bool]] = {path: _read(path)}
        #: Bumped by every ``set``; a watcher holding another number is answered at once.
        #: Starts from the clock, so a restarted actor never repeats a number it handed out.
        self.version = time.time_ns()
        self._changed: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None

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
        self.touch()

    def touch(self) -> None:
        """Answer every watcher now, without a state change: gateway replicas then re-read
        what else they follow (LoRA adapters registered in the store by another replica)."""
        self.version += 1
        if self._loop is not None:
            # Ray may run a sync method of an async actor off the loop's thread.
            self._loop.call_soon_threadsafe(self._wake_watchers)

    def _wake_watchers(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def watch(
        self, version: Optional[int], timeout_s: float, path: Optional[str] = None
    ) -> tuple[int, dict[str, bool]]:
        """Long poll: ``(version, state of path)`` as soon as the version differs from
        ``version`` (at once when it already does, or for ``None``), else after ``timeout_s``.

        The version counts changes of every app's state: a change to another app's file
        answers too, with this app's (unchanged) state, which costs one more call.
        """
        if version == self.version:
            self._loop = asyncio.get_running_loop()
            if self._changed is None:
                self._changed = asyncio.Event()
            changed = self._changed
            try:
                async with asyncio.timeout(timeout_s):
                    await changed.wait()
            except TimeoutError:
                pass
        return self.version, self.get_all(path)

"""ModelStateActor: which configured models are unloaded, kept across redeploys.

A plain class (no Ray here); the gateway applies ``ray.remote`` with the name
``troupe-model-state`` (detached, restartable). The state is also written to a small
JSON file beside the ledger, so it survives a restart of the actor or of Ray.

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
        #: Bumped by every ``set``; a watcher holding another number is answered at once.
        #: Starts from the clock, so a restarted actor never repeats a number it handed out.
        self.version = time.time_ns()
        self._changed: Optional[asyncio.Event] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
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
        self.version += 1
        if self._loop is not None:
            # Ray may run a sync method of an async actor off the loop's thread.
            self._loop.call_soon_threadsafe(self._wake_watchers)

    def _wake_watchers(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    async def watch(
        self, version: Optional[int], timeout_s: float
    ) -> tuple[int, dict[str, bool]]:
        """Long poll: ``(version, state)`` as soon as the version differs from ``version``
        (at once when it already does, or for ``None``), else after ``timeout_s``."""
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
        return self.version, dict(self.state)

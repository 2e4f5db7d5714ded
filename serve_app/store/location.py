"""Where an application's state lives: by default, a folder of its own.

Each Serve application running Troupe keeps its ledger, API keys, idempotency records,
batch jobs, admin-set credentials and model load state in one store. Unless its config
names one (``metrics.store_url``; ``session.store_url`` for credentials), that store is a
SQLite file in a folder of the application's own::

    $TROUPE_STATE_DIR/apps/<app name>-<digest>/troupe.db     (+ model_state.json)

``$TROUPE_STATE_DIR`` defaults to ``~/.local/share/troupe``; ``<digest>`` is a short hash
of what the application serves (its models' ids, modalities and engine types), so a
benchmark of ``config/mock.yaml`` and ``make run`` of ``config/local.yaml`` (both Serve
apps named ``troupe``) no longer share a ledger, while tuning a model's options keeps
its state. Two applications share state only when their configs name the same store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

__all__ = [
    "StateLocation",
    "app_state_location",
    "config_digest",
    "serve_app_name",
    "state_root",
    "STATE_DIR_ENV",
]

#: Environment variable naming the folder under which each app's state folder is made.
STATE_DIR_ENV = "TROUPE_STATE_DIR"
#: The app name outside a Serve replica (in-process tests, a CLI without a config).
DEFAULT_APP = "default"


def state_root() -> str:
    """``$TROUPE_STATE_DIR``, else ``~/.local/share/troupe`` (absolute)."""
    base = os.environ.get(STATE_DIR_ENV) or os.path.expanduser("~/.local/share/troupe")
    return os.path.abspath(base)


def config_digest(models: Any) -> str:
    """8 hex digits naming what an app serves: its models' ids, modalities, engine types.

    ``models``: the settings' model configs (anything with ``id``, ``modality``, ``engine.type``).
    """
    served = sorted((m.id, m.modality, m.engine.type) for m in models)
    return hashlib.sha256(json.dumps(served).encode()).hexdigest()[:8]


def serve_app_name() -> str:
    """The Serve application this replica belongs to (``default`` outside Serve)."""
    try:
        from ray import serve

        return serve.get_replica_context().app_name or DEFAULT_APP
    except Exception:  # not inside a Serve replica (in-process tests, the CLI)
        return DEFAULT_APP


def _sqlite_path(url: str) -> Optional[str]:
    if url.startswith("sqlite:///"):
        return "/" + url[len("sqlite:///"):].lstrip("/")
    if "://" not in url:
        return os.path.abspath(url)
    return None


@dataclass(frozen=True)
class StateLocation:
    """One application's state: its store and the folder beside it."""

    #: The Serve application's name.
    app: str
    #: The store every state table of the app uses (ledger, keys, idempotency, batches).
    store_url: str
    #: The folder for the app's files (``model_state.json``): the app's own by default,
    #: the folder of a configured SQLite file otherwise.
    directory: str
    #: True when the config named the store (it may be shared on purpose).
    configured: bool

    @property
    def model_state_file(self) -> str:
        return os.path.join(self.directory, "model_state.json")

    def describe(self) -> str:
        """One log line: where the state is, and how to share it."""
        if self.configured:
            return (f"app {self.app!r}: state in {self.store_url} (metrics.store_url from "
                    "the config; apps naming the same store share it)")
        return (f"app {self.app!r}: state in {self.directory} (this app's own; set "
                "metrics.store_url to share a store between apps)")


def app_state_location(
    store_url: Optional[str], digest: str, app_name: Optional[str] = None
) -> StateLocation:
    """The state location of an app: ``store_url`` when its config names one, else the
    app's own folder (named by ``app_name``, default: this replica's Serve app, and
    ``digest``, see :func:`config_digest`)."""
    app = app_name or serve_app_name()
    own = os.path.join(state_root(), "apps", f"{re.sub(r'[^A-Za-z0-9_.-]', '_', app)}-{digest}")
    if store_url:
        path = _sqlite_path(store_url)
        return StateLocation(app, store_url, os.path.dirname(path) if path else own, True)
    url = "sqlite:///" + os.path.join(own, "troupe.db").lstrip("/")
    return StateLocation(app, url, own, False)


def settings_state_location(settings: Any, app_name: Optional[str] = None) -> StateLocation:
    """:func:`app_state_location` of a settings tree (``metrics.store_url``, its models)."""
    return app_state_location(settings.metrics.store_url, config_digest(settings.models), app_name)


def legacy_store_note(location: StateLocation) -> Optional[str]:
    """A hint when an app without a configured store finds the store every app shared
    before state became per app (``$TROUPE_STATE_DIR/troupe.db``); None otherwise."""
    old = os.path.join(state_root(), "troupe.db")
    if location.configured or not os.path.exists(old):
        return None
    return (f"an earlier Troupe kept every app's state in {old}; this app now starts from "
            f"its own folder. To keep using the old one, set metrics.store_url: "
            f"sqlite:///{old.lstrip('/')}")


__all__ += ["settings_state_location", "legacy_store_note"]

"""The CLI's one reader of a Serve config file (``troupe run``, ``validate``, ``status``,
``keys``): its Troupe applications, by Serve app name, validated, and its HTTP options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from serve_app.settings import ConfigError, TroupeSettings, load_settings
from serve_app.store.location import StateLocation, settings_state_location

__all__ = ["ServeConfig", "read_serve_config", "validate", "TROUPE_IMPORT_PATH"]

#: The ``import_path`` prefix that marks a Troupe application.
TROUPE_IMPORT_PATH = "serve_app.build.app:"


@dataclass
class ServeConfig:
    """A Serve config's Troupe applications and HTTP options."""

    path: Path
    #: Serve app name -> its validated Troupe settings (other apps are left out).
    apps: dict[str, TroupeSettings] = field(default_factory=dict)
    http: dict[str, Any] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return self.http.get("host", "127.0.0.1")

    @property
    def port(self) -> int:
        return int(self.http.get("port", 8000))

    def state(self) -> StateLocation:
        """Where the first Troupe app keeps its state (as its gateway computes it)."""
        if not self.apps:
            raise ConfigError(f"{self.path} has no Troupe application")
        name, settings = next(iter(self.apps.items()))
        return settings_state_location(settings, name)


def read_serve_config(path: Path) -> ServeConfig:
    """Read and validate every Troupe application in a Serve config file.

    Raises:
        ConfigError: unreadable, not a Serve config, or naming the bad field's path.
    """
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict) or not data.get("applications"):
        raise ConfigError(f"{path} is not a Serve config: it has no 'applications' list")
    config = ServeConfig(path, http=data.get("http_options") or {})
    for i, app in enumerate(data["applications"]):
        if str(app.get("import_path", "")).startswith(TROUPE_IMPORT_PATH):
            try:
                config.apps[app.get("name", "default")] = load_settings(app.get("args") or {})
            except ConfigError as exc:
                raise ConfigError(f"applications.{i}.args: {exc}") from None
    return config


def validate(path: Path) -> list[TroupeSettings]:
    """Validate every Troupe application in a Serve config file."""
    return list(read_serve_config(path).apps.values())

"""Settings primitives: the config error and the strict base model."""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
)

__all__ = [
    "ConfigError",
    "Strict",
]


class ConfigError(ValueError):
    """The configuration is invalid; the message names every bad field by its path."""


class Strict(BaseModel):
    """Base of every settings model: unknown fields are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

"""Who is asking, for the code a request runs (context variables set by the policy layer).

The policy middleware sets the request's :class:`Principal` and a usage tally before the
route runs; the gateway core reads the principal to check model scopes
(:func:`authorize_model`) and adds the tokens each model call used (:func:`note_usage`),
so tokens-per-minute limits charge real usage. Tiny and dependency-free: the core
imports it.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Optional

from serve_app.errors import AuthorizationFailed

__all__ = [
    "Principal",
    "UsageTally",
    "ANONYMOUS",
    "current_principal",
    "authorize_model",
    "note_usage",
    "PRINCIPAL",
    "USAGE",
]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: an API key or a JWT subject (or anonymous, auth off).

    ``role``: ``workspace`` (any model), ``models`` (only ``models``), ``admin``.
    """

    key_id: str
    role: str
    models: frozenset[str] = frozenset()
    limits: dict[str, Any] = field(default_factory=dict)
    via: str = "key"  # key | jwt | none

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    def may_use(self, model_id: str) -> bool:
        return self.role != "models" or model_id in self.models


ANONYMOUS = Principal("anonymous", "admin", via="none")


class UsageTally:
    """Tokens the request's model calls used (prompt + completion)."""

    __slots__ = ("tokens",)

    def __init__(self) -> None:
        self.tokens = 0


PRINCIPAL: ContextVar[Optional[Principal]] = ContextVar("troupe_principal", default=None)
USAGE: ContextVar[Optional[UsageTally]] = ContextVar("troupe_usage", default=None)


def current_principal() -> Optional[Principal]:
    return PRINCIPAL.get()


def authorize_model(model_id: str) -> None:
    """403 when the caller's key is scoped to other models (no-op without a principal)."""
    principal = PRINCIPAL.get()
    if principal is not None and not principal.may_use(model_id):
        raise AuthorizationFailed(
            f"This API key ({principal.key_id}) may not use model {model_id!r}; it is scoped "
            f"to: {', '.join(sorted(principal.models)) or '(none)'}. Use a key with access to "
            "this model, or one of the models above.",
            param="model",
            details={"model": model_id, "allowed_models": sorted(principal.models)},
        )


def note_usage(tokens: int) -> None:
    tally = USAGE.get()
    if tally is not None:
        tally.tokens += tokens

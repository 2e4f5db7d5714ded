"""Admin authentication for ``/admin`` routes, in one small function so the API-key
policies can replace it (admin keys stored hashed) without touching the routes.

With auth on, the policy layer authenticates admins (admin API keys from the store or
JWTs); with auth off the admin key is a shared secret read from the environment variable
named by ``gateway.admin_key_env`` (default ``TROUPE_ADMIN_KEY``), sent as ``Authorization:
Bearer <key>`` or ``x-api-key: <key>``. Without that variable the admin routes are off
(403), never open.
"""

from __future__ import annotations

import hmac
import os
from typing import Any

from serve_app.errors import AuthenticationFailed, AuthorizationFailed

__all__ = ["require_admin"]


def _presented_key(headers: Any) -> str:
    auth = headers.get("authorization") or ""
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip()
    return (headers.get("x-api-key") or "").strip()


def require_admin(headers: Any, admin_key_env: str) -> str:
    """Raise unless the caller is an admin; returns the caller's id.

    With the policy layer on, an admin API key or JWT it authenticated is enough (the
    layer already refused everyone else on ``/admin``). With auth off (loopback, no keys)
    the shared admin key from ``admin_key_env`` is still required.
    """
    from serve_app.policies.context import current_principal

    principal = current_principal()
    if principal is not None and principal.via != "none" and principal.is_admin:
        return principal.key_id
    expected = os.environ.get(admin_key_env, "").strip()
    if not expected:
        raise AuthorizationFailed(
            f"Admin routes are disabled: no admin key is configured. Set the environment "
            f"variable {admin_key_env} on the gateway (gateway.admin_key_env) and send it "
            "as `Authorization: Bearer <admin key>`.",
        )
    presented = _presented_key(headers)
    if not presented:
        raise AuthenticationFailed(
            "This admin route needs the admin key: send `Authorization: Bearer <admin key>`."
        )
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise AuthenticationFailed(
            "The admin key is not valid. Send the key from "
            f"{admin_key_env} as `Authorization: Bearer <admin key>`."
        )
    return "admin"

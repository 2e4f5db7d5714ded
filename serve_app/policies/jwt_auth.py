"""JWT bearer tokens (HS256 or RS256, via PyJWT): ``exp`` required, scope and model claims.

Claims: ``sub`` (becomes the key id ``jwt:<sub>``), ``exp`` (required), ``scope``
(space-separated; ``admin`` makes an admin, ``models`` a model-scoped caller, anything
else a workspace caller), ``models`` (list of model ids for a scoped caller).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jwt

from serve_app.errors import AuthenticationFailed
from serve_app.policies.context import Principal
from serve_app.settings.policies import JWTSettings

__all__ = ["JWTVerifier", "looks_like_jwt"]


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("ey")


class JWTVerifier:
    """Verifies tokens against one configured key."""

    def __init__(self, settings: JWTSettings) -> None:
        self.settings = settings
        if settings.algorithm == "HS256":
            secret = os.environ.get(settings.secret_env or "")
            if not secret:
                raise ValueError(f"auth.jwt: environment variable {settings.secret_env} is empty")
            self._key: Any = secret
        else:
            self._key = Path(settings.public_key_file or "").read_text()

    def verify(self, token: str) -> Principal:
        s = self.settings
        try:
            claims = jwt.decode(
                token, self._key, algorithms=[s.algorithm], audience=s.audience,
                issuer=s.issuer, leeway=s.leeway_s,
                options={"require": ["exp", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationFailed("The JWT has expired (its 'exp' is past); get a new token.") from None
        except jwt.InvalidTokenError as exc:
            raise AuthenticationFailed(f"The JWT is not valid: {exc}.") from None
        scopes = str(claims.get("scope", "")).split()
        models = claims.get("models") or []
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise AuthenticationFailed("The JWT's 'models' claim must be a list of model ids.")
        role = "admin" if "admin" in scopes else "models" if ("models" in scopes or models) else "workspace"
        return Principal(f"jwt:{claims['sub']}", role, frozenset(models), via="jwt")

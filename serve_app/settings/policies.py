"""Settings of the gateway policies: ``auth``, ``limits``, ``idempotency``, ``cors``.

Sections of :class:`serve_app.settings.TroupeSettings`. Imports neither Ray nor the store.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "JWTSettings",
    "AuthSettings",
    "RateLimits",
    "LimitsSettings",
    "IdempotencySettings",
    "CORSSettings",
    "BatchSettings",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class JWTSettings(_Strict):
    """Optional JWT bearer tokens, besides API keys (verified with PyJWT)."""

    algorithm: Literal["HS256", "RS256"] = Field("HS256", description="Signature algorithm.")
    secret_env: Optional[str] = Field(
        None, description="HS256: environment variable holding the shared secret."
    )
    public_key_file: Optional[str] = Field(
        None, description="RS256: PEM file with the issuer's public key."
    )
    issuer: Optional[str] = Field(None, description="Required 'iss' claim, when set.")
    audience: Optional[str] = Field(None, description="Required 'aud' claim, when set.")
    leeway_s: float = Field(5, ge=0, le=300, description="Clock skew allowed on 'exp'/'nbf'.")

    @model_validator(mode="after")
    def _key_source(self) -> "JWTSettings":
        if self.algorithm == "HS256" and not self.secret_env:
            raise ValueError("HS256 needs secret_env (the variable holding the secret)")
        if self.algorithm == "RS256" and not self.public_key_file:
            raise ValueError("RS256 needs public_key_file")
        return self


class AuthSettings(_Strict):
    """API keys (hashed in the state store) and JWTs."""

    mode: Literal["auto", "required"] = Field(
        "auto",
        description="auto: auth is off only while the gateway is bound to loopback and no "
        "key exists (logged loudly); required: always on.",
    )
    key_refresh_s: float = Field(
        2.0, gt=0, le=300,
        description="How often each gateway replica reloads keys from the store: a new or "
        "revoked key takes effect within this time.",
    )
    jwt: Optional[JWTSettings] = Field(None, description="Accept JWT bearer tokens too.")
    websocket_origins: list[str] = Field(
        default_factory=list,
        description="Browser Origins allowed on /ws (e.g. https://app.example.com); '*' "
        "allows any. A request without an Origin header (not a browser) is not checked; "
        "the gateway's own origin is always allowed.",
    )
    public_paths: list[str] = Field(
        default_factory=lambda: ["/health", "/", "/static/", "/docs", "/openapi.json"],
        description="Paths served without a key (exact, or a prefix when ending in '/').",
    )


class RateLimits(_Strict):
    """Per-key limits (None: unlimited). Also the shape of a key's overrides."""

    requests_per_minute: Optional[int] = Field(None, ge=1, description="Requests per minute.")
    requests_per_hour: Optional[int] = Field(None, ge=1, description="Requests per hour.")
    tokens_per_minute: Optional[int] = Field(
        None, ge=1, description="Prompt + completion tokens per minute (charged on completion)."
    )
    concurrent_requests: Optional[int] = Field(None, ge=1, description="Requests in flight.")

    def merged(self, overrides: dict) -> "RateLimits":
        """These limits with a key's overrides applied (an override of 0 means unlimited)."""
        data = self.model_dump()
        for name, value in overrides.items():
            if name in data:
                data[name] = value or None
        return RateLimits.model_validate(data)

    def any(self) -> bool:
        return any(v is not None for v in self.model_dump().values())


class LimitsSettings(_Strict):
    """Rate limits per key, exact across gateway replicas (a quota actor leases blocks)."""

    default: RateLimits = Field(
        default_factory=RateLimits, description="Limits of every key (keys may override)."
    )
    minute_s: float = Field(
        60.0, gt=0, le=60, description="Length of the 'minute' window (tests shorten it)."
    )
    hour_s: float = Field(
        3600.0, gt=0, le=3600, description="Length of the 'hour' window (tests shorten it)."
    )
    lease_fraction: float = Field(
        0.02, gt=0, le=0.5,
        description="Share of a limit a replica leases from the quota actor at a time.",
    )
    actor_num_cpus: float = Field(0.05, ge=0, description="CPUs reserved for the quota actor.")


class IdempotencySettings(_Strict):
    """``Idempotency-Key`` on non-streaming POSTs (records in the state store)."""

    enabled: bool = Field(True, description="Honour Idempotency-Key headers.")
    ttl_s: float = Field(86_400, gt=0, description="How long a stored response is replayed.")
    max_stored_bytes: int = Field(
        1024 * 1024, ge=0,
        description="Largest response body kept; larger ones answer "
        "IDEMPOTENCY_REPLAY_UNAVAILABLE on repeat.",
    )


class CORSSettings(_Strict):
    """Cross-origin browser access (Starlette's CORSMiddleware); off when no origin is set."""

    allow_origins: list[str] = Field(default_factory=list, description="Allowed origins.")
    allow_methods: list[str] = Field(
        default_factory=lambda: ["GET", "POST", "DELETE", "OPTIONS"], description="Methods."
    )
    allow_headers: list[str] = Field(
        default_factory=lambda: ["authorization", "content-type", "x-api-key",
                                 "idempotency-key", "x-client-request-id"],
        description="Request headers a browser may send.",
    )
    max_age_s: int = Field(600, ge=0, description="How long browsers cache a preflight.")


class BatchSettings(_Strict):
    """Batch jobs (POST /batch): stored in the state store, run by the gateway replicas."""

    enabled: bool = Field(True, description="Serve /batch and run stored jobs.")
    max_requests: int = Field(1000, ge=1, le=100_000, description="Requests per job.")
    concurrency: int = Field(4, ge=1, le=256, description="Batch requests in flight per replica.")
    poll_interval_s: float = Field(1.0, gt=0, le=60, description="How often replicas look for work.")
    item_lease_s: Optional[float] = Field(
        None, gt=0,
        description="How long a claimed request is held before another replica may take it "
        "over (a replica that died); default gateway.request_timeout_s + 30.",
    )
    webhook_secret_env: str = Field(
        "TROUPE_WEBHOOK_SECRET", description="Environment variable with the signing secret."
    )
    webhook_secret_file: Optional[str] = Field(
        None, description="File holding the signing secret (instead of the variable)."
    )
    webhook_allow: list[str] = Field(
        default_factory=list,
        description="Hosts or networks (CIDR) webhooks may reach although private.",
    )
    webhook_max_attempts: int = Field(6, ge=1, le=20, description="Deliveries tried.")
    webhook_backoff_s: float = Field(
        2.0, gt=0, le=3600, description="First retry delay; doubles each attempt."
    )
    webhook_timeout_s: float = Field(10.0, gt=0, le=120, description="Per delivery attempt.")

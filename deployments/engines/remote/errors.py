"""How an upstream failure becomes a Troupe error: the table of provider HTTP statuses, the
classified :class:`UpstreamFailure` the retry loop acts on, and the failures the
transport itself meets (timeouts by phase, unreachable upstream, a body that is not JSON).

A provider engine may know an answer better than its status (``classify_error``: a 400
that is really a context-length error, a 400 that is really a bad key); what it does not
claim falls to :data:`STATUS_ERRORS`. The provider's error object is always kept, trimmed
and scrubbed of the key, in ``details["upstream_error"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple, Optional

from deployments.engines.remote.upstream_util import RETRYABLE_STATUS
from serve_app.errors import (
    AuthenticationFailed,
    AuthorizationFailed,
    InferenceFailed,
    InvalidRequest,
    PaymentRequired,
    RateLimitExceeded,
    Timeout,
    TroupeError,
)

__all__ = [
    "UpstreamFailure",
    "StatusRule",
    "STATUS_ERRORS",
    "SERVER_ERROR",
    "OTHER_STATUS",
    "error_for_status",
    "classify_answer",
    "Failures",
]


@dataclass
class UpstreamFailure(Exception):
    """A failed attempt, classified: what to raise, and whether another attempt may help."""

    error: TroupeError
    retryable: bool = False
    retry_after_s: Optional[float] = None
    auth: bool = False
    #: Counts against the circuit breaker (5xx, 408, timeouts, connection errors).
    breaker: bool = False

    def __post_init__(self) -> None:
        Exception.__init__(self, self.error.message)


class StatusRule(NamedTuple):
    """The Troupe error of one upstream status and what its message says after
    "The upstream provider of model '…'" (fields: ``message``, ``status``,
    ``credential``, ``env``)."""

    error: type[TroupeError]
    text: str
    #: Whether the error carries the upstream's ``Retry-After`` hint.
    hint: bool = False


#: Upstream status -> Troupe error, when the provider's ``classify_error`` has no better one.
STATUS_ERRORS: dict[int, StatusRule] = {
    401: StatusRule(
        AuthenticationFailed,
        "rejected the API key (credential {credential!r}, env ${env}): {message}. Set a valid "
        "key in that variable, the secrets file, or with POST /admin/credentials.",
    ),
    402: StatusRule(
        PaymentRequired,
        "refused the request for billing reasons: {message}. Check the provider account's "
        "plan and credits.",
    ),
    403: StatusRule(
        AuthorizationFailed,
        "refused access: {message}. Check the key's project, organization and model "
        "permissions.",
    ),
    429: StatusRule(
        RateLimitExceeded,
        "is rate limiting requests: {message}. Retry after the Retry-After delay.",
        hint=True,
    ),
    408: StatusRule(
        InferenceFailed, "failed with HTTP {status}: {message}. Retrying may help.", hint=True
    ),
}
#: Any 5xx.
SERVER_ERROR = STATUS_ERRORS[408]
#: Every other status: the upstream refused the request as such.
OTHER_STATUS = StatusRule(InvalidRequest, "rejected the request with HTTP {status}: {message}.")


def error_for_status(
    status: int, error: dict[str, Any], hint: Optional[float], model_id: str, provider: str,
    config: Any,
) -> TroupeError:
    """The Troupe error of an upstream ``status`` by :data:`STATUS_ERRORS`."""
    rule = STATUS_ERRORS.get(status) or (SERVER_ERROR if status >= 500 else OTHER_STATUS)
    message = str(error.get("message") or f"HTTP {status}")
    text = rule.text.format(message=message, status=status,
                            credential=config.credential_name, env=config.api_key_env)
    kwargs: dict[str, Any] = {
        "details": {"provider": provider, "upstream_status": status, "upstream_error": error},
    }
    if rule.hint:
        kwargs["retry_after_s"] = hint
    if rule.error is InvalidRequest:
        kwargs["param"] = error.get("param") if isinstance(error.get("param"), str) else None
    return rule.error(f"The upstream provider of model '{model_id}' {text}", **kwargs)


def classify_answer(
    status: int, error: dict[str, Any], hint: Optional[float], specific: Optional[TroupeError],
    model_id: str, provider: str, config: Any,
) -> UpstreamFailure:
    """An upstream non-200 answer as a classified failure: ``specific`` (the provider's own
    classification) when given, else :func:`error_for_status`. Retried: 408, 409, 429 and
    5xx, never an authentication, request or billing error; the breaker counts 5xx and 408."""
    retryable = status in RETRYABLE_STATUS
    breaker = status >= 500 or status == 408
    if specific is None:
        return UpstreamFailure(
            error_for_status(status, error, hint, model_id, provider, config),
            retryable=retryable, retry_after_s=hint, auth=status == 401, breaker=breaker,
        )
    specific.details = {"provider": provider, "upstream_status": status,
                        "upstream_error": error, **specific.details}
    auth = status == 401 or isinstance(specific, AuthenticationFailed)
    if auth or isinstance(specific, (InvalidRequest, PaymentRequired)):
        retryable = breaker = False
    return UpstreamFailure(specific, retryable=retryable, retry_after_s=hint,
                           auth=auth, breaker=breaker)


@dataclass(frozen=True)
class Failures:
    """The failures the transport meets on its own, worded for one engine's model."""

    model_id: str
    provider: str

    def timeout(self, phase: str, limit_s: float, retryable: bool) -> UpstreamFailure:
        return UpstreamFailure(Timeout(
            f"The upstream provider of model '{self.model_id}' did not answer in time "
            f"(phase {phase}: no progress within {limit_s:g}s). Retrying may help; the "
            f"limits are the engine's *_timeout_s settings.",
            details={"phase": phase, "timeout_s": limit_s, "provider": self.provider},
        ), retryable=retryable, breaker=True)

    def connection(self, exc: BaseException, url: str) -> UpstreamFailure:
        where = f" at {url.split('?')[0]}" if url else ""
        return UpstreamFailure(InferenceFailed(
            f"Could not reach the upstream provider of model '{self.model_id}'{where}: "
            f"{type(exc).__name__}. Check base_url and the network; retrying may help.",
            details={"provider": self.provider, "exception": type(exc).__name__},
        ), retryable=True, breaker=True)

    def not_json(self) -> UpstreamFailure:
        return UpstreamFailure(InferenceFailed(
            f"The upstream provider of model '{self.model_id}' sent a body that is not "
            "JSON.", details={"provider": self.provider}), retryable=True)

    def cut_short(self, tokens_received: int) -> UpstreamFailure:
        return UpstreamFailure(InferenceFailed(
            f"The upstream stream for model '{self.model_id}' ended before the "
            "answer finished. Retrying may help.",
            details={"provider": self.provider, "tokens_received": tokens_received},
        ), retryable=True, breaker=True)

    def no_finish_reason(self) -> UpstreamFailure:
        return UpstreamFailure(InferenceFailed(
            f"The upstream stream for model '{self.model_id}' ended without a finish "
            "reason. Retrying may help.",
            details={"provider": self.provider},
        ), retryable=True, breaker=True)

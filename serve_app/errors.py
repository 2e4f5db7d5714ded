"""Troupe's errors: one class per kind, each with a fixed HTTP status and code.

::

    TroupeError                      (500 INTERNAL_ERROR)
     ├── InvalidRequest              400 INVALID_REQUEST
     │    ├── ContextLengthExceeded  400 CONTEXT_LENGTH_EXCEEDED
     │    ├── ContentFiltered        400 CONTENT_FILTERED
     │    └── AdapterInvalid         400 ADAPTER_INVALID
     ├── AuthenticationFailed        401 AUTHENTICATION_FAILED
     ├── PaymentRequired             402 PAYMENT_REQUIRED
     ├── AuthorizationFailed         403 AUTHORIZATION_FAILED
     ├── NotFound                    404 NOT_FOUND
     │    └── ModelNotFound          404 MODEL_NOT_FOUND
     │         └── AdapterNotFound   404 ADAPTER_NOT_FOUND
     ├── MethodNotAllowed            405 METHOD_NOT_ALLOWED
     ├── ModelNotLoaded              409 MODEL_NOT_LOADED
     ├── IdempotencyInProgress       409 IDEMPOTENCY_IN_PROGRESS
     ├── IdempotencyReplayUnavailable 409 IDEMPOTENCY_REPLAY_UNAVAILABLE
     ├── IdempotencyKeyReused        422 IDEMPOTENCY_KEY_REUSED
     ├── RequestTooLarge             413 REQUEST_TOO_LARGE
     ├── RateLimitExceeded           429 RATE_LIMIT_EXCEEDED
     ├── Overloaded                  429 OVERLOADED  (503 when no replica exists)
     ├── InferenceFailed             500 INFERENCE_FAILED
     ├── Timeout                     504 TIMEOUT
     └── InternalError               500 INTERNAL_ERROR

The wire shapes (OpenAI, Anthropic, Gemini, native) are produced here and nowhere else:
routes raise, the gateway's exception handlers and stream encoders call
:func:`openai_error_body`, :func:`anthropic_error_body`, :func:`gemini_error_body` or
:func:`native_error_body`.
Never pick a status by reading message text.

Errors cross Ray handles (raised in a model replica, caught at the gateway), so every
class pickles with its keyword fields intact.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

from serve_app.protocol.anthropic import ANTHROPIC_ERROR_TYPES
from serve_app.protocol.anthropic import error_envelope as anthropic_envelope

__all__ = [
    "TroupeError",
    "InvalidRequest",
    "ContextLengthExceeded",
    "ContentFiltered",
    "PaymentRequired",
    "AuthenticationFailed",
    "AuthorizationFailed",
    "NotFound",
    "ModelNotFound",
    "AdapterNotFound",
    "AdapterInvalid",
    "MethodNotAllowed",
    "ModelNotLoaded",
    "RequestTooLarge",
    "IdempotencyInProgress",
    "IdempotencyReplayUnavailable",
    "IdempotencyKeyReused",
    "RateLimitExceeded",
    "Overloaded",
    "InferenceFailed",
    "Timeout",
    "InternalError",
    "openai_error_body",
    "native_error_body",
    "anthropic_error_type",
    "anthropic_error_body",
    "gemini_error_body",
    "as_troupe_error",
]


class TroupeError(Exception):
    """Base class. Subclasses fix ``status``, ``code`` and ``openai_type``."""

    status: int = 500
    code: str = "INTERNAL_ERROR"
    openai_type: str = "server_error"
    #: Set once the request's failure was reported to metrics (so it is counted once).
    metered: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: Optional[str] = None,
        details: Optional[dict[str, Any]] = None,
        retry_after_s: Optional[float] = None,
        status: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.details = details or {}
        self.retry_after_s = retry_after_s
        if status is not None:  # only Overloaded uses this (429 queue full vs 503 no replica)
            self.status = status

    def __reduce__(self):  # keep keyword fields across pickling (Ray handles)
        return (
            _rebuild_error,
            (type(self), self.message, self.param, self.details, self.retry_after_s, self.status),
        )

    def headers(self) -> dict[str, str]:
        """Extra response headers this error implies (``Retry-After``)."""
        if self.retry_after_s is None:
            return {}
        # Round up: a client that obeys a rounded-down delay retries too early.
        return {"Retry-After": str(max(1, math.ceil(self.retry_after_s)))}


def _rebuild_error(cls, message, param, details, retry_after_s, status):
    err = cls(message, param=param, details=details, retry_after_s=retry_after_s)
    err.status = status
    return err


class InvalidRequest(TroupeError):
    status, code, openai_type = 400, "INVALID_REQUEST", "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    status, code, openai_type = 400, "CONTEXT_LENGTH_EXCEEDED", "invalid_request_error"


class ContentFiltered(InvalidRequest):
    status, code, openai_type = 400, "CONTENT_FILTERED", "invalid_request_error"


class PaymentRequired(TroupeError):
    status, code, openai_type = 402, "PAYMENT_REQUIRED", "insufficient_quota"


class AuthenticationFailed(TroupeError):
    status, code, openai_type = 401, "AUTHENTICATION_FAILED", "authentication_error"


class AuthorizationFailed(TroupeError):
    status, code, openai_type = 403, "AUTHORIZATION_FAILED", "permission_error"


class NotFound(TroupeError):
    status, code, openai_type = 404, "NOT_FOUND", "not_found_error"


class ModelNotFound(NotFound):
    status, code, openai_type = 404, "MODEL_NOT_FOUND", "not_found_error"


class AdapterNotFound(ModelNotFound):
    """A LoRA adapter id the base model does not know (the message lists the known ones)."""

    status, code, openai_type = 404, "ADAPTER_NOT_FOUND", "not_found_error"


class AdapterInvalid(InvalidRequest):
    """A LoRA adapter that cannot be served: missing files, another base, rank too large."""

    status, code, openai_type = 400, "ADAPTER_INVALID", "invalid_request_error"


class MethodNotAllowed(TroupeError):
    status, code, openai_type = 405, "METHOD_NOT_ALLOWED", "invalid_request_error"


class ModelNotLoaded(TroupeError):
    status, code, openai_type = 409, "MODEL_NOT_LOADED", "invalid_request_error"


class RequestTooLarge(TroupeError):
    status, code, openai_type = 413, "REQUEST_TOO_LARGE", "invalid_request_error"


class IdempotencyInProgress(TroupeError):
    status, code, openai_type = 409, "IDEMPOTENCY_IN_PROGRESS", "invalid_request_error"


class IdempotencyReplayUnavailable(TroupeError):
    status, code, openai_type = 409, "IDEMPOTENCY_REPLAY_UNAVAILABLE", "invalid_request_error"


class IdempotencyKeyReused(TroupeError):
    status, code, openai_type = 422, "IDEMPOTENCY_KEY_REUSED", "invalid_request_error"


class RateLimitExceeded(TroupeError):
    status, code, openai_type = 429, "RATE_LIMIT_EXCEEDED", "rate_limit_error"
    #: x-ratelimit-* headers of the limit that refused (set by the limiter).
    rate_headers: Sequence[tuple[bytes, bytes]] = ()


class Overloaded(TroupeError):
    status, code, openai_type = 429, "OVERLOADED", "rate_limit_error"


class InferenceFailed(TroupeError):
    status, code, openai_type = 500, "INFERENCE_FAILED", "server_error"


class Timeout(TroupeError):
    status, code, openai_type = 504, "TIMEOUT", "timeout_error"


class InternalError(TroupeError):
    status, code, openai_type = 500, "INTERNAL_ERROR", "server_error"


def as_troupe_error(exc: BaseException) -> TroupeError:
    """Return ``exc`` as a TroupeError; anything unknown becomes INTERNAL_ERROR.

    Ray wraps a replica's exception in a RayTaskError that is *also* an instance of the
    original class, so ``isinstance`` sees through it; its ``cause`` is the original.
    """
    if isinstance(exc, TroupeError):
        cause = getattr(exc, "cause", None)
        return cause if isinstance(cause, TroupeError) else exc
    return InternalError(
        "The server hit an unexpected error while handling this request. It has been "
        "logged with the request id; retrying may help.",
        details={"exception": type(exc).__name__},
    )


def openai_error_body(err: TroupeError, request_id: Optional[str] = None) -> dict[str, Any]:
    """OpenAI's envelope: ``{"error": {"message", "type", "param", "code"}}``."""
    body: dict[str, Any] = {
        "message": err.message,
        "type": err.openai_type,
        "param": err.param,
        "code": err.code.lower(),
    }
    if request_id:
        body["request_id"] = request_id
    return {"error": body}


def native_error_body(err: TroupeError, request_id: Optional[str] = None) -> dict[str, Any]:
    """Troupe's native envelope: ``{"error": {code, message, details}, request_id, timestamp}``."""
    details = dict(err.details)
    if err.param and "param" not in details:
        details["param"] = err.param
    if err.retry_after_s is not None:
        details.setdefault("retry_after_s", err.retry_after_s)
    return {
        "error": {"code": err.code, "message": err.message, "details": details},
        "request_id": request_id,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def anthropic_error_type(err: TroupeError) -> str:
    """Anthropic's error ``type`` for ``err``: by its fixed status (Anthropic's table);
    ``Overloaded`` is ``overloaded_error`` whether it answers 429 or 503."""
    if isinstance(err, Overloaded):
        return "overloaded_error"
    known = ANTHROPIC_ERROR_TYPES.get(err.status)
    if known is not None:
        return known
    return "invalid_request_error" if err.status < 500 else "api_error"


def anthropic_error_body(err: TroupeError, request_id: Optional[str] = None) -> dict[str, Any]:
    """Anthropic's envelope: ``{"type": "error", "error": {"type", "message"}, "request_id"}``."""
    return anthropic_envelope(anthropic_error_type(err), err.message, request_id)


#: Google's canonical error ``status`` for an HTTP status (google.rpc.Code's mapping).
GEMINI_STATUS: dict[int, str] = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    402: "FAILED_PRECONDITION",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    409: "FAILED_PRECONDITION",
    413: "INVALID_ARGUMENT",
    422: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


def gemini_error_body(err: TroupeError, request_id: Optional[str] = None) -> dict[str, Any]:
    """Google's envelope: ``{"error": {"code", "message", "status", "details"}}``."""
    status = GEMINI_STATUS.get(err.status, "INVALID_ARGUMENT" if err.status < 500 else "INTERNAL")
    info: dict[str, Any] = {"troupe_code": err.code}
    if err.param:
        info["field"] = err.param
    if request_id:
        info["request_id"] = request_id
    detail = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": err.code,
              "domain": "troupe", "metadata": info}
    return {"error": {"code": err.status, "message": err.message, "status": status,
                      "details": [detail]}}

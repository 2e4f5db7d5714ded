"""Unit tests for serve_app.errors: classes, pickling across handles, wire envelopes."""

from __future__ import annotations

import pickle
import re

import pytest

from serve_app import errors
from serve_app.errors import (
    AdapterInvalid,
    AdapterNotFound,
    AuthenticationFailed,
    AuthorizationFailed,
    ContentFiltered,
    ContextLengthExceeded,
    IdempotencyInProgress,
    IdempotencyKeyReused,
    IdempotencyReplayUnavailable,
    InferenceFailed,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    ModelNotFound,
    ModelNotLoaded,
    NotFound,
    Overloaded,
    PaymentRequired,
    RateLimitExceeded,
    RequestTooLarge,
    Timeout,
    TroupeError,
    as_troupe_error,
    native_error_body,
    openai_error_body,
)

# class, status, code, OpenAI error type
EXPECTED = [
    (TroupeError, 500, "INTERNAL_ERROR", "server_error"),
    (InvalidRequest, 400, "INVALID_REQUEST", "invalid_request_error"),
    (ContextLengthExceeded, 400, "CONTEXT_LENGTH_EXCEEDED", "invalid_request_error"),
    (ContentFiltered, 400, "CONTENT_FILTERED", "invalid_request_error"),
    (PaymentRequired, 402, "PAYMENT_REQUIRED", "insufficient_quota"),
    (AuthenticationFailed, 401, "AUTHENTICATION_FAILED", "authentication_error"),
    (AuthorizationFailed, 403, "AUTHORIZATION_FAILED", "permission_error"),
    (NotFound, 404, "NOT_FOUND", "not_found_error"),
    (ModelNotFound, 404, "MODEL_NOT_FOUND", "not_found_error"),
    (AdapterNotFound, 404, "ADAPTER_NOT_FOUND", "not_found_error"),
    (AdapterInvalid, 400, "ADAPTER_INVALID", "invalid_request_error"),
    (MethodNotAllowed, 405, "METHOD_NOT_ALLOWED", "invalid_request_error"),
    (ModelNotLoaded, 409, "MODEL_NOT_LOADED", "invalid_request_error"),
    (RequestTooLarge, 413, "REQUEST_TOO_LARGE", "invalid_request_error"),
    (IdempotencyInProgress, 409, "IDEMPOTENCY_IN_PROGRESS", "invalid_request_error"),
    (IdempotencyReplayUnavailable, 409, "IDEMPOTENCY_REPLAY_UNAVAILABLE", "invalid_request_error"),
    (IdempotencyKeyReused, 422, "IDEMPOTENCY_KEY_REUSED", "invalid_request_error"),
    (RateLimitExceeded, 429, "RATE_LIMIT_EXCEEDED", "rate_limit_error"),
    (Overloaded, 429, "OVERLOADED", "rate_limit_error"),
    (InferenceFailed, 500, "INFERENCE_FAILED", "server_error"),
    (Timeout, 504, "TIMEOUT", "timeout_error"),
    (InternalError, 500, "INTERNAL_ERROR", "server_error"),
]

TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


@pytest.mark.parametrize(("cls", "status", "code", "openai_type"), EXPECTED)
def test_each_class_has_fixed_status_code_and_openai_type(cls, status, code, openai_type) -> None:
    err = cls("something went wrong")
    assert (err.status, err.code, err.openai_type) == (status, code, openai_type)
    assert isinstance(err, TroupeError)
    assert str(err) == "something went wrong"


def test_every_exported_error_class_is_covered() -> None:
    exported = {
        getattr(errors, name)
        for name in errors.__all__
        if isinstance(getattr(errors, name), type)
        and issubclass(getattr(errors, name), TroupeError)
    }
    assert exported == {cls for cls, *_ in EXPECTED}


def test_context_length_is_an_invalid_request_and_model_not_found_a_not_found() -> None:
    assert issubclass(ContextLengthExceeded, InvalidRequest)
    assert issubclass(ModelNotFound, NotFound)


def test_overloaded_may_say_503_without_changing_the_class_default() -> None:
    assert Overloaded("no replica", status=503).status == 503
    assert Overloaded("queue full").status == 429


@pytest.mark.parametrize(("cls", "status", "code", "openai_type"), EXPECTED)
def test_pickle_round_trip_keeps_every_field(cls, status, code, openai_type) -> None:
    err = cls(
        "it broke",
        param="messages.0.content",
        details={"limit": 4, "nested": {"a": [1, 2]}},
        retry_after_s=2.5,
    )
    copy = pickle.loads(pickle.dumps(err))

    assert type(copy) is cls
    assert copy.message == "it broke"
    assert str(copy) == "it broke"
    assert copy.param == "messages.0.content"
    assert copy.details == {"limit": 4, "nested": {"a": [1, 2]}}
    assert copy.retry_after_s == 2.5
    assert copy.status == status
    assert copy.code == code


def test_pickle_round_trip_keeps_an_overridden_status() -> None:
    copy = pickle.loads(pickle.dumps(Overloaded("no replica", retry_after_s=5, status=503)))
    assert copy.status == 503
    assert copy.headers() == {"Retry-After": "5"}


def test_openai_body_has_lower_case_code_and_openai_type() -> None:
    err = ModelNotFound("Model 'x' is not served here.", param="model")
    assert openai_error_body(err) == {
        "error": {
            "message": "Model 'x' is not served here.",
            "type": "not_found_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


def test_openai_body_carries_request_id_when_known() -> None:
    body = openai_error_body(InvalidRequest("bad"), "req_abc")
    assert body["error"]["request_id"] == "req_abc"
    assert body["error"]["code"] == "invalid_request"
    assert body["error"]["param"] is None


def test_native_body_has_upper_case_code_request_id_and_timestamp() -> None:
    err = RateLimitExceeded("slow down", param="key", details={"limit": 10}, retry_after_s=3)
    body = native_error_body(err, "req_123")

    assert set(body) == {"error", "request_id", "timestamp"}
    assert body["request_id"] == "req_123"
    assert TIMESTAMP.match(body["timestamp"]), body["timestamp"]
    assert body["error"]["code"] == "RATE_LIMIT_EXCEEDED"
    assert body["error"]["message"] == "slow down"
    assert body["error"]["details"] == {"limit": 10, "param": "key", "retry_after_s": 3}


def test_native_body_does_not_mutate_the_error() -> None:
    err = InvalidRequest("bad", param="x", details={"a": 1}, retry_after_s=1)
    native_error_body(err, "req_1")
    assert err.details == {"a": 1}


def test_retry_after_header_is_whole_seconds_rounded_up_and_at_least_one() -> None:
    assert RateLimitExceeded("x", retry_after_s=2.4).headers() == {"Retry-After": "3"}
    assert RateLimitExceeded("x", retry_after_s=7).headers() == {"Retry-After": "7"}
    assert RateLimitExceeded("x", retry_after_s=0.2).headers() == {"Retry-After": "1"}
    assert RateLimitExceeded("x").headers() == {}


def test_as_troupe_error_passes_troupe_errors_through() -> None:
    err = Timeout("too slow")
    assert as_troupe_error(err) is err


def test_as_troupe_error_unwraps_a_cause() -> None:
    # Ray's RayTaskError subclasses the original class and keeps it as ``cause``.
    class WrappedTaskError(InferenceFailed):
        pass

    original = ModelNotLoaded("unloaded")
    wrapper = WrappedTaskError("wrapped")
    wrapper.cause = original  # type: ignore[attr-defined]
    assert as_troupe_error(wrapper) is original


def test_as_troupe_error_hides_a_plain_exceptions_message() -> None:
    secret = "password=hunter2 at /srv/secret/path"
    err = as_troupe_error(KeyError(secret))

    assert isinstance(err, InternalError)
    assert err.code == "INTERNAL_ERROR"
    assert err.status == 500
    assert secret not in err.message
    assert "hunter2" not in str(openai_error_body(err))
    assert "hunter2" not in str(native_error_body(err))
    assert err.details == {"exception": "KeyError"}

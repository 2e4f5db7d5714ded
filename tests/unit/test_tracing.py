"""Tracing without Ray: the three hops of one request simulated in-process.

The gateway hop is the real ``TracingMiddleware`` over a tiny ASGI app; the carrier
crosses a pickle round trip, as it does inside a GenerationRequest over a Ray handle;
the deployment/engine hop follows the span pattern of ``LLMDeployment.stream``.
Finished spans go through the real BatchSpanProcessor -> BufferingSpanExporter ->
TraceBuffer path, exactly as in a replica (with the buffer standing in for the actor).
Also: sampling, and the middleware's details.
"""

from __future__ import annotations

import asyncio
import pickle
from typing import Any, AsyncIterator, Callable, Optional

import pytest

from serve_app import tracing
from serve_app.errors import InferenceFailed, TroupeError
from serve_app.tracing import (
    ATTR_CANCELLED,
    ATTR_ERROR_CODE,
    ATTR_FINISH_REASONS,
    ATTR_INPUT_TOKENS,
    ATTR_MODEL,
    ATTR_OUTPUT_TOKENS,
    ATTR_REQUEST_ID,
    SpanKind,
    TracingMiddleware,
)
from tests.unit.tracing_fakes import CLIENT_SPAN_ID, CLIENT_TRACE_ID, CLIENT_TRACEPARENT, collected


# ---------------------------------------------------------------- the three hops


async def model_replica_stream(
    carrier_bytes: bytes, tokens: int = 3, fail: Optional[BaseException] = None
) -> AsyncIterator[str]:
    """What LLMDeployment.stream does with spans (the proposed edit), over a fake engine."""
    carrier = pickle.loads(carrier_bytes)  # as the replica receives it
    span = tracing.start_span(
        "deployment.stream",
        parent=tracing.extract_context(carrier),
        kind=SpanKind.SERVER,
        attributes={ATTR_MODEL: "mock-small", ATTR_REQUEST_ID: "req_1"},
    )
    engine_span = tracing.start_span(
        "engine.generate", parent=span, attributes={ATTR_MODEL: "mock-small", ATTR_REQUEST_ID: "req_1"}
    )
    failure: Optional[BaseException] = None
    completion = 0
    finish: Optional[str] = None
    try:
        for i in range(tokens):
            await asyncio.sleep(0)
            if fail is not None and i == 1:
                raise fail
            completion += 1
            if i == tokens - 1:
                finish = "stop"
            yield f"t{i}"
    except (asyncio.CancelledError, GeneratorExit) as exc:
        failure = None if finish is not None else exc
        raise
    except Exception as exc:
        failure = exc
        raise
    finally:
        usage = {ATTR_INPUT_TOKENS: 7, ATTR_OUTPUT_TOKENS: completion}
        if finish is not None:
            usage[ATTR_FINISH_REASONS] = (finish,)
        tracing.end_span(engine_span, failure, usage)
        tracing.end_span(span, failure)


def gateway_app(
    carriers: list[Optional[dict[str, str]]],
    fail: Optional[BaseException] = None,
    status: int = 200,
    cancel_after: Optional[int] = None,
) -> Callable[..., Any]:
    """A route: inject the current context (as GatewayCore.build_request will), stream."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        carrier = tracing.inject_context()
        carriers.append(carrier)
        stream = model_replica_stream(pickle.dumps(carrier), fail=fail)
        await send({"type": "http.response.start", "status": status, "headers": []})
        try:
            n = 0
            async for token in stream:
                await send({"type": "http.response.body", "body": token.encode(), "more_body": True})
                n += 1
                if cancel_after is not None and n >= cancel_after:
                    break  # the client went away: the gateway closes the stream
        except TroupeError as exc:
            tracing.record_error(tracing.current_span(), exc)  # as error_event_data will
        finally:
            await stream.aclose()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return app


async def call(app: Any, path: str = "/v1/chat/completions", headers: Optional[list] = None) -> list[dict]:
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "headers": headers if headers is not None else [(b"traceparent", CLIENT_TRACEPARENT.encode())],
        "state": {"request_id": "req_1"},
    }
    await TracingMiddleware(app)(scope, receive, send)
    return sent


def by_name(trace: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["name"]: s for s in trace["spans"]}


async def test_one_request_is_one_connected_trace_with_the_clients_trace_id(trace_buffer) -> None:
    buffer = trace_buffer()
    carriers: list = []
    await call(gateway_app(carriers))
    traces = collected(buffer)
    assert len(traces) == 1
    trace = traces[0]
    assert trace["trace_id"] == CLIENT_TRACE_ID
    assert trace["root_name"] == "POST /v1/chat/completions"
    spans = by_name(trace)
    gateway, deployment, engine = (
        spans["POST /v1/chat/completions"], spans["deployment.stream"], spans["engine.generate"],
    )
    assert gateway["parent_id"] == CLIENT_SPAN_ID
    assert deployment["parent_id"] == gateway["span_id"]
    assert engine["parent_id"] == deployment["span_id"]
    assert {s["trace_id"] for s in trace["spans"]} == {CLIENT_TRACE_ID}
    assert gateway["kind"] == "server" and deployment["kind"] == "server"
    assert gateway["attributes"][ATTR_REQUEST_ID] == "req_1"
    assert gateway["attributes"]["http.response.status_code"] == 200
    assert engine["attributes"] == {
        ATTR_MODEL: "mock-small", ATTR_REQUEST_ID: "req_1",
        ATTR_INPUT_TOKENS: 7, ATTR_OUTPUT_TOKENS: 3, ATTR_FINISH_REASONS: ["stop"],
    }
    assert all(s["status"]["code"] == "UNSET" for s in trace["spans"])
    # The gateway span covers the whole stream; the engine span sits inside the deployment's.
    assert gateway["start_unix_nano"] <= deployment["start_unix_nano"] <= engine["start_unix_nano"]
    assert engine["end_unix_nano"] <= deployment["end_unix_nano"] <= gateway["end_unix_nano"]
    assert trace["duration_ms"] == pytest.approx(
        (gateway["end_unix_nano"] - gateway["start_unix_nano"]) / 1e6, abs=1e-3
    )
    # What crossed the handle: a small plain dict naming the gateway span as parent.
    assert carriers == [{"traceparent": f"00-{CLIENT_TRACE_ID}-{gateway['span_id']}-01"}]


async def test_without_a_client_traceparent_the_gateway_starts_a_new_trace(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([]), headers=[(b"traceparent", b"not-a-traceparent")])
    (trace,) = collected(buffer)
    spans = by_name(trace)
    assert trace["trace_id"] != CLIENT_TRACE_ID
    assert spans["POST /v1/chat/completions"]["parent_id"] is None
    assert spans["engine.generate"]["trace_id"] == trace["trace_id"]


async def test_tracestate_is_carried_to_the_deployment(trace_buffer) -> None:
    trace_buffer()
    carriers: list = []
    headers = [(b"traceparent", CLIENT_TRACEPARENT.encode()), (b"tracestate", b"vendor=abc")]
    await call(gateway_app(carriers), headers=headers)
    assert carriers[0]["tracestate"] == "vendor=abc"


async def test_an_engine_failure_marks_every_hop_with_the_troupe_error_code(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([], fail=InferenceFailed("engine crashed")))
    spans = by_name(collected(buffer)[0])
    for name in ("engine.generate", "deployment.stream", "POST /v1/chat/completions"):
        assert spans[name]["status"]["code"] == "ERROR", name
        assert spans[name]["status"]["description"].startswith("INFERENCE_FAILED: engine crashed")
        assert spans[name]["attributes"][ATTR_ERROR_CODE] == "INFERENCE_FAILED"
    assert collected(buffer)[0]["error"] is True


async def test_an_unexpected_exception_is_an_internal_error_naming_its_type(trace_buffer) -> None:
    buffer = trace_buffer()
    with pytest.raises(RuntimeError):
        await call(gateway_app([], fail=RuntimeError("boom")))
    spans = by_name(collected(buffer)[0])
    for name in ("engine.generate", "POST /v1/chat/completions"):
        assert spans[name]["status"]["code"] == "ERROR"
        assert spans[name]["attributes"][ATTR_ERROR_CODE] == "INTERNAL_ERROR"
        assert spans[name]["attributes"]["exception.type"] == "RuntimeError"


async def test_a_5xx_response_marks_the_gateway_span_failed(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([], status=503))
    spans = by_name(collected(buffer)[0])
    assert spans["POST /v1/chat/completions"]["status"] == {"code": "ERROR", "description": "HTTP 503"}
    assert spans["deployment.stream"]["status"]["code"] == "UNSET"


async def test_a_cancelled_stream_ends_its_spans_as_cancelled_not_failed(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([], cancel_after=1))
    spans = by_name(collected(buffer)[0])
    for name in ("engine.generate", "deployment.stream"):
        assert spans[name]["attributes"][ATTR_CANCELLED] is True
        assert spans[name]["status"]["code"] == "UNSET"
    assert spans["engine.generate"]["attributes"][ATTR_OUTPUT_TOKENS] == 1
    assert ATTR_FINISH_REASONS not in spans["engine.generate"]["attributes"]


async def test_closing_after_the_final_chunk_is_not_a_cancellation(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([], cancel_after=3))  # break on the last token, then aclose()
    spans = by_name(collected(buffer)[0])
    assert ATTR_CANCELLED not in spans["engine.generate"]["attributes"]
    assert spans["engine.generate"]["attributes"][ATTR_FINISH_REASONS] == ["stop"]


async def test_client_disconnect_cancels_the_gateway_span(trace_buffer) -> None:
    buffer = trace_buffer()
    started = asyncio.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        started.set()
        await asyncio.Event().wait()

    task = asyncio.create_task(call(slow_app))
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    (span,) = collected(buffer)[0]["spans"]
    assert span["attributes"][ATTR_CANCELLED] is True


# ---------------------------------------------------------------- sampling


async def test_ratio_zero_records_nothing_but_still_propagates_the_trace_id(trace_buffer) -> None:
    buffer = trace_buffer(sample_ratio=0.0)
    carriers: list = []
    await call(gateway_app(carriers), headers=[])
    assert collected(buffer) == []
    (carrier,) = carriers
    _version, trace_id, span_id, flags = carrier["traceparent"].split("-")
    assert int(flags, 16) & 0x01 == 0  # the sampled bit is off (0x02 may say "random id")
    assert int(trace_id, 16) != 0 and int(span_id, 16) != 0
    remote = tracing.extract_context(pickle.loads(pickle.dumps(carrier)))
    child = tracing.start_span("deployment.stream", parent=remote)
    assert not child.is_recording()
    assert format(child.get_span_context().trace_id, "032x") == trace_id
    tracing.end_span(child)
    assert collected(buffer) == []


async def test_ratio_zero_still_honors_a_clients_sampled_traceparent(trace_buffer) -> None:
    buffer = trace_buffer(sample_ratio=0.0)
    await call(gateway_app([]))
    (trace,) = collected(buffer)
    assert trace["trace_id"] == CLIENT_TRACE_ID and trace["span_count"] == 3


# ---------------------------------------------------------------- middleware details


async def test_health_and_metrics_are_not_traced(trace_buffer) -> None:
    buffer = trace_buffer()
    await call(gateway_app([]), path="/health")
    await call(gateway_app([]), path="/metrics")
    # No gateway span: the model hop, called with no context, starts traces of its own.
    names = {s["name"] for t in collected(buffer) for s in t["spans"]}
    assert names == {"deployment.stream", "engine.generate"}


async def test_the_span_is_named_by_the_matched_route_template(trace_buffer) -> None:
    buffer = trace_buffer()

    class Route:
        path = "/v1/models/{model_id:path}"

    async def app(scope: Any, receive: Any, send: Any) -> None:
        scope["route"] = Route()  # what Starlette's router sets on a match
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}", "more_body": False})

    await call(app, path="/v1/models/mock-small")
    (trace,) = collected(buffer)
    assert trace["root_name"] == "POST /v1/models/{model_id:path}"
    assert trace["spans"][0]["attributes"]["url.path"] == "/v1/models/mock-small"


async def test_a_websocket_makes_the_clients_context_current_without_a_span(trace_buffer) -> None:
    buffer = trace_buffer()
    seen: list = []

    async def ws_app(scope: Any, receive: Any, send: Any) -> None:
        async def one_inference() -> None:  # a WS request task, as websocket.py creates
            with tracing.traced("WS inference", kind=SpanKind.SERVER) as span:
                seen.append(tracing.inject_context(span))

        await asyncio.create_task(one_inference())

    scope = {"type": "websocket", "path": "/ws", "headers": [(b"traceparent", CLIENT_TRACEPARENT.encode())]}
    await TracingMiddleware(ws_app)(scope, None, None)
    (trace,) = collected(buffer)
    assert trace["trace_id"] == CLIENT_TRACE_ID
    assert trace["spans"][0]["parent_id"] == CLIENT_SPAN_ID
    assert seen[0]["traceparent"].startswith(f"00-{CLIENT_TRACE_ID}-")


def test_traced_records_an_error_and_restores_the_outer_context(trace_buffer) -> None:
    buffer = trace_buffer()
    with tracing.traced("outer") as outer:
        with pytest.raises(InferenceFailed), tracing.traced("inner"):
            raise InferenceFailed("bad")
        assert tracing.current_span() is outer
    spans = by_name(collected(buffer)[0])
    assert spans["inner"]["parent_id"] == spans["outer"]["span_id"]
    assert spans["inner"]["status"]["code"] == "ERROR"
    assert spans["outer"]["status"]["code"] == "UNSET"

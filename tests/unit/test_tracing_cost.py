"""What tracing costs on the request path (off and on), and that the tracing modules
import neither Ray nor torch."""

from __future__ import annotations

import pickle
import subprocess
import sys
import time
from typing import Any, Callable


from serve_app import tracing
from serve_app.tracing import (
    ATTR_FINISH_REASONS,
    ATTR_INPUT_TOKENS,
    ATTR_MODEL,
    ATTR_OUTPUT_TOKENS,
    ATTR_REQUEST_ID,
    SpanKind,
)
from tests.unit.tracing_fakes import CLIENT_TRACEPARENT, collected


# ---------------------------------------------------------------- cost


def _per_call_us(fn: Callable[[], Any], n: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


def test_disabled_tracing_costs_almost_nothing(trace_buffer) -> None:
    buffer = trace_buffer(enabled=False)
    assert not tracing.tracing_enabled()
    carrier = {"traceparent": CLIENT_TRACEPARENT}
    headers = [(b"traceparent", CLIENT_TRACEPARENT.encode())]
    off_span = tracing.start_span("x")
    assert off_span is tracing.INVALID_SPAN and tracing.inject_context() is None

    def in_block() -> None:
        with tracing.traced("x"):
            pass

    costs = {
        "start_span": _per_call_us(lambda: tracing.start_span("x", kind=SpanKind.SERVER), 100_000),
        "end_span": _per_call_us(lambda: tracing.end_span(off_span), 100_000),
        "inject_context": _per_call_us(tracing.inject_context, 100_000),
        "extract_context": _per_call_us(lambda: tracing.extract_context(carrier), 100_000),
        "context_from_headers": _per_call_us(lambda: tracing.context_from_headers(headers), 100_000),
        "traced": _per_call_us(in_block, 100_000),
    }
    print("\ndisabled path, us per call:", {k: round(v, 3) for k, v in costs.items()})
    assert all(cost < 5.0 for cost in costs.values()), costs
    assert collected(buffer) == []


def test_enabled_cost_per_request(trace_buffer) -> None:
    """Three spans + inject + pickle + extract, the gateway-to-engine path; reported."""
    trace_buffer()
    headers = [(b"host", b"gw"), (b"traceparent", CLIENT_TRACEPARENT.encode())]

    def one_request() -> None:
        gateway = tracing.start_span(
            "POST /v1/chat/completions", parent=tracing.context_from_headers(headers),
            kind=SpanKind.SERVER, attributes={ATTR_REQUEST_ID: "req_1"},
        )
        carrier = pickle.loads(pickle.dumps(tracing.inject_context(gateway)))
        deployment = tracing.start_span(
            "deployment.stream", parent=tracing.extract_context(carrier), kind=SpanKind.SERVER,
            attributes={ATTR_MODEL: "m", ATTR_REQUEST_ID: "req_1"},
        )
        engine = tracing.start_span("engine.generate", parent=deployment, attributes={ATTR_MODEL: "m"})
        tracing.end_span(engine, None, {ATTR_INPUT_TOKENS: 7, ATTR_OUTPUT_TOKENS: 16,
                                        ATTR_FINISH_REASONS: ("stop",)})
        tracing.end_span(deployment)
        tracing.end_span(gateway)

    cost = _per_call_us(one_request, 5_000)
    tracing.flush_tracing()
    print(f"\nenabled path: {cost:.1f} us per request (3 spans + inject/extract)")
    assert cost < 2_000  # a request through Serve costs milliseconds; this must stay far below


def test_the_modules_import_neither_ray_nor_torch() -> None:
    code = (
        "import sys, serve_app.tracing, actors.traces; "
        "bad = [m for m in ('ray', 'torch') if m in sys.modules]; "
        "assert not bad, bad; "
        "missing = [n for n in serve_app.tracing.__all__ if not hasattr(serve_app.tracing, n)]; "
        "assert not missing, missing"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

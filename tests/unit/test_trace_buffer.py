"""The TraceBuffer behind GET /traces: grouping spans into traces, bounds, bad input."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from actors.traces import TraceBuffer


# ---------------------------------------------------------------- TraceBuffer


def span(trace_id: str, span_id: str, parent: Optional[str] = None, start: int = 0, end: int = 0,
         status: str = "UNSET") -> dict[str, Any]:
    return {
        "trace_id": trace_id, "span_id": span_id, "parent_id": parent, "name": f"n-{span_id}",
        "kind": "internal", "start_unix_nano": start, "end_unix_nano": end, "attributes": {},
        "status": {"code": status, "description": None}, "role": "test",
    }


def test_buffer_groups_spans_of_a_trace_arriving_in_separate_batches() -> None:
    buffer = TraceBuffer()
    buffer.add([span("t1", "c", "b", 3_000_000, 4_000_000)])  # engine, from the model replica
    buffer.add([span("t1", "b", "a", 2_000_000, 5_000_000, status="ERROR")])
    buffer.add([span("t1", "a", "client", 1_000_000, 9_000_000)])  # gateway, last to finish
    (trace,) = buffer.recent(5)
    assert trace["root_name"] == "n-a"  # its parent is the client's span, not in the trace
    assert [s["span_id"] for s in trace["spans"]] == ["a", "b", "c"]
    assert trace["duration_ms"] == 8.0 and trace["start"] == pytest.approx(0.001)
    assert trace["error"] is True and trace["span_count"] == 3


def test_buffer_keeps_the_newest_traces_and_evicts_the_oldest() -> None:
    buffer = TraceBuffer(max_traces=3)
    for i in range(5):
        buffer.add([span(f"t{i}", "s", start=i, end=i + 1)])
    assert [t["trace_id"] for t in buffer.recent(10)] == ["t4", "t3", "t2"]
    assert buffer.evicted_traces == 2 and len(buffer) == 3
    buffer.add([span("t2", "late")])  # a late span makes its trace the newest again
    assert [t["trace_id"] for t in buffer.recent(2)] == ["t2", "t4"]
    assert buffer.recent(0) == []


def test_buffer_bounds_spans_per_trace() -> None:
    buffer = TraceBuffer(max_spans_per_trace=4)
    buffer.add([span("t", f"s{i}", start=i, end=i) for i in range(10)])
    (trace,) = buffer.recent(1)
    assert trace["span_count"] == 4 and trace["dropped_spans"] == 6
    assert [s["span_id"] for s in trace["spans"]] == ["s0", "s1", "s2", "s3"]


def test_buffer_rejects_malformed_spans_and_invalid_bounds() -> None:
    buffer = TraceBuffer()
    buffer.add([{"span_id": "x"}, "nonsense", span("t", "ok")])  # type: ignore[list-item]
    assert buffer.rejected_spans == 2 and len(buffer) == 1
    with pytest.raises(ValueError):
        TraceBuffer(max_traces=0)


def test_recent_returns_copies_the_caller_may_change() -> None:
    buffer = TraceBuffer()
    buffer.add([span("t", "a")])
    buffer.recent(1)[0]["spans"].clear()
    assert buffer.recent(1)[0]["span_count"] == 1

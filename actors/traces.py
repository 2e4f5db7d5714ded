"""TraceBuffer: the last N finished traces, grouped by trace id, in bounded memory.

Spans of one request finish in several processes (gateway replica, model replica) and
reach the buffer in separate batches, in any order, from
:class:`serve_app.tracing.BufferingSpanExporter`. The buffer groups them by trace id and
keeps the traces most recently added to; ``GET /traces`` reads :meth:`TraceBuffer.recent`.

A span is a plain dict (the exporter's format)::

    {"trace_id": "4bf9…" (32 hex), "span_id": "00f0…" (16 hex), "parent_id": str | None,
     "name": str, "kind": "server" | "internal" | ..., "start_unix_nano": int,
     "end_unix_nano": int, "attributes": {...}, "status": {"code", "description"},
     "role": "gateway" | "model" | None}

Plain Python: imports neither Ray nor torch nor OpenTelemetry, so the metrics actor can
hold one and unit tests can exercise it directly.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Iterable, Optional

__all__ = ["TraceBuffer"]


class _Trace:
    """The spans kept for one trace id, plus running bounds (no rescans on read)."""

    __slots__ = ("spans", "dropped", "start", "end")

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.dropped = 0
        self.start: Optional[int] = None
        self.end: Optional[int] = None


class TraceBuffer:
    """A ring buffer of traces keyed by trace id; the least recently added-to goes first.

    Args:
        max_traces: traces kept; adding a span of a new trace beyond this evicts the
            trace that was added to least recently.
        max_spans_per_trace: spans kept per trace; later spans of a full trace are
            counted in ``dropped_spans`` and discarded.

    Thread-safe: the exporter thread of a co-located process may add while a route reads.
    """

    def __init__(self, max_traces: int = 200, max_spans_per_trace: int = 64) -> None:
        if max_traces < 1 or max_spans_per_trace < 1:
            raise ValueError("max_traces and max_spans_per_trace must be at least 1")
        self.max_traces = max_traces
        self.max_spans_per_trace = max_spans_per_trace
        self._traces: OrderedDict[str, _Trace] = OrderedDict()
        self._lock = threading.Lock()
        self.evicted_traces = 0
        self.rejected_spans = 0  # malformed input (no string trace_id)

    def __len__(self) -> int:
        return len(self._traces)

    def add(self, spans: Iterable[dict[str, Any]]) -> None:
        """Add finished spans (any mix of traces, in any order)."""
        with self._lock:
            for span in spans:
                trace_id = span.get("trace_id") if isinstance(span, dict) else None
                if not isinstance(trace_id, str):
                    self.rejected_spans += 1
                    continue
                trace = self._traces.get(trace_id)
                if trace is None:
                    trace = self._traces[trace_id] = _Trace()
                    while len(self._traces) > self.max_traces:
                        self._traces.popitem(last=False)
                        self.evicted_traces += 1
                else:
                    self._traces.move_to_end(trace_id)
                if len(trace.spans) >= self.max_spans_per_trace:
                    trace.dropped += 1
                    continue
                trace.spans.append(span)
                start, end = span.get("start_unix_nano"), span.get("end_unix_nano")
                if isinstance(start, int) and (trace.start is None or start < trace.start):
                    trace.start = start
                if isinstance(end, int) and (trace.end is None or end > trace.end):
                    trace.end = end

    def recent(self, n: int = 20) -> list[dict[str, Any]]:
        """The ``n`` traces most recently added to, newest first.

        Each is ``{"trace_id", "root_name", "start" (unix s), "start_unix_nano",
        "duration_ms", "span_count", "dropped_spans", "error", "spans"}``; spans are
        sorted by start time. The root is the earliest span whose parent is not in the
        trace (its parent may be the client's span, from its ``traceparent``).
        """
        with self._lock:
            picked: list[tuple[str, list[dict[str, Any]], int, Optional[int], Optional[int]]] = []
            for trace_id in reversed(self._traces):
                if len(picked) >= n:
                    break
                trace = self._traces[trace_id]
                picked.append((trace_id, list(trace.spans), trace.dropped, trace.start, trace.end))
        return [_summarize(*item) for item in picked]

    def clear(self) -> None:
        with self._lock:
            self._traces.clear()


def _summarize(
    trace_id: str,
    spans: list[dict[str, Any]],
    dropped: int,
    start: Optional[int],
    end: Optional[int],
) -> dict[str, Any]:
    spans.sort(key=lambda s: s.get("start_unix_nano") or 0)
    ids = {s.get("span_id") for s in spans}
    root = next((s for s in spans if s.get("parent_id") not in ids), spans[0] if spans else None)
    return {
        "trace_id": trace_id,
        "root_name": root.get("name") if root else None,
        "start": start / 1e9 if start is not None else None,
        "start_unix_nano": start,
        "duration_ms": round((end - start) / 1e6, 3) if start is not None and end is not None else None,
        "span_count": len(spans),
        "dropped_spans": dropped,
        "error": any((s.get("status") or {}).get("code") == "ERROR" for s in spans),
        "spans": spans,
    }

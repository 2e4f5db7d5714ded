"""Export of finished spans: as plain dicts to a sink (the metrics actor's
``TraceBuffer``, which serves ``GET /traces``), off the request path."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanKind, StatusCode

__all__ = ["SpanSink", "span_to_dict", "BufferingSpanExporter", "ActorSpanSink"]

logger = logging.getLogger("troupe.tracing")

#: A callable that receives each exported batch of span dicts (see :func:`span_to_dict`).
SpanSink = Callable[[list[dict[str, Any]]], None]


def span_to_dict(span: ReadableSpan, role: Optional[str] = None) -> dict[str, Any]:
    """A finished span as plain, picklable data (the format ``TraceBuffer`` groups)."""
    ctx = span.context
    parent = span.parent
    status = span.status
    attributes: dict[str, Any] = dict(span.attributes) if span.attributes else {}  # a copy: the span's own is read-only
    for key, value in attributes.items():
        if type(value) is tuple:  # sequence attributes: JSON-shaped lists
            attributes[key] = list(value)
    return {
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(parent.span_id, "016x") if parent is not None else None,
        "name": span.name,
        "kind": _KIND_NAMES[span.kind],
        "start_unix_nano": span.start_time,
        "end_unix_nano": span.end_time,
        "attributes": attributes,
        "status": {"code": _STATUS_NAMES[status.status_code], "description": status.description},
        "role": role,
    }


_KIND_NAMES = {kind: kind.name.lower() for kind in SpanKind}
_STATUS_NAMES = {code: code.name for code in StatusCode}


class BufferingSpanExporter(SpanExporter):
    """Hands each batch of finished spans, as dicts, to a sink (runs on the SDK's thread).

    Args:
        sink: called once per batch, e.g. :class:`ActorSpanSink` or ``TraceBuffer.add``.
        role: the process role stamped on each span ("gateway", "model").
    """

    def __init__(self, sink: SpanSink, role: Optional[str] = None) -> None:
        self._sink = sink
        self._role = role
        self._failures = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        role = self._role
        batch = [span_to_dict(s, role) for s in spans]
        try:
            self._sink(batch)
        except Exception as exc:  # a lost batch must never break the exporter thread
            self._failures += 1
            if self._failures == 1 or self._failures % 100 == 0:
                logger.warning(
                    "dropped %d finished spans: the trace sink failed (%s: %s); %d failures so far",
                    len(batch), type(exc).__name__, exc, self._failures,
                )
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True


class ActorSpanSink:
    """A span sink that sends each batch, fire-and-forget, to the metrics actor's ``record_spans``.

    The actor is looked up on the first batch (on the exporter's thread, off the request
    path) and again after a failure, so a restarted metrics actor is found.

    Args:
        actor_name: the metrics actor's name.
        namespace: its Ray namespace (None: the current one).
        resolve: returns the actor handle (tests pass a fake); default ``ray.get_actor``.
    """

    def __init__(
        self,
        actor_name: str,
        namespace: Optional[str] = None,
        resolve: Optional[Callable[[], Any]] = None,
    ) -> None:
        self._actor_name = actor_name
        self._namespace = namespace
        self._resolve = resolve or self._get_actor
        self._actor: Any = None

    def _get_actor(self) -> Any:
        import ray  # lazy: this module must import without Ray

        return ray.get_actor(self._actor_name, namespace=self._namespace)

    def __call__(self, spans: list[dict[str, Any]]) -> None:
        if self._actor is None:
            self._actor = self._resolve()
        try:
            self._actor.record_spans.remote(spans)
        except Exception:
            self._actor = None  # look it up again next batch
            raise

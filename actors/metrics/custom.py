"""Custom metrics (``POST /metrics/custom``: named gauges and counters, exposed as
``troupe_custom_<name>``) and the built-in gauges many gateway replicas report, each
checked against a label schema and a cardinality bound."""

from __future__ import annotations

import math
import re
import time
from typing import Any, Iterator, Mapping

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from serve_app.errors import InvalidRequest

__all__ = ["BUILTIN_GAUGES", "MAX_LABEL_SETS", "GAUGE_TTL_S", "CustomMetrics", "Gauges"]

BUILTIN_GAUGES: dict[str, tuple[tuple[str, ...], str]] = {
    "in_flight_requests": (("deployment",), "Requests in flight per deployment (all gateway replicas)."),
    "replicas": (("application", "deployment", "state"),
                 "Serve replicas per deployment and state (polled from serve.status())."),
    # Local engines' own queues, per model replica (pushed by the replicas, issue 17).
    "engine_queue_depth": (("deployment", "model", "replica"),
                           "Requests waiting in a local engine's queue, not yet running."),
    "engine_running_requests": (("deployment", "model", "replica"),
                                "Requests a local engine is running (its batch)."),
    "engine_expected_wait_seconds": (
        ("deployment", "model", "replica"),
        "Expected queue wait of a new interactive request at a local engine "
        "(requests ahead x recent service time); admission refuses waits above "
        "max_queue_wait_s."),
}
"""Gauges :meth:`MetricsActor.set_gauge` accepts: name -> (label names, help)."""

_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MAX_NAME_CHARS = 100
MAX_LABELS = 8
MAX_LABEL_SETS = 1000
MAX_LABEL_VALUE_CHARS = 256
MAX_CUSTOM_METRICS = 200
GAUGE_TTL_S = 60.0
_CUSTOM_EXAMPLE = (
    '{"name": "queue_depth", "kind": "gauge", "value": 3, "labels": {"region": "eu"}}'
)


def _invalid(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"{message}. Example of a valid body: {_CUSTOM_EXAMPLE}", param=param)


def check_labels(labels: Mapping[str, Any]) -> None:
    if not isinstance(labels, Mapping):
        raise _invalid(f"labels must be an object of name -> string, got {type(labels).__name__}",
                       "labels")
    if len(labels) > MAX_LABELS:
        raise _invalid(f"{len(labels)} labels given; at most {MAX_LABELS} are allowed", "labels")
    for label, value in labels.items():
        if not isinstance(label, str) or not _LABEL_RE.match(label) or label.startswith("__"):
            raise _invalid(
                f"label name {label!r} is not valid: use letters, digits and '_', not starting "
                "with a digit or '__'", "labels")
        if not isinstance(value, str) or len(value) > MAX_LABEL_VALUE_CHARS:
            raise _invalid(
                f"label {label!r} must have a string value of at most {MAX_LABEL_VALUE_CHARS} "
                f"characters, got {value!r:.80}", "labels")


def check_value(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _invalid(f"value must be a finite number, got {value!r}", "value")
    return float(value)


class LabelledValues:
    """Values per label set, with a fixed label schema and a cardinality bound."""

    __slots__ = ("kind", "label_names", "values", "help")

    def __init__(self, kind: str, label_names: tuple[str, ...], help_text: str) -> None:
        self.kind = kind
        self.label_names = label_names
        self.values: dict[tuple[str, ...], Any] = {}
        self.help = help_text

    def slot(self, name: str, labels: Mapping[str, str]) -> tuple[str, ...]:
        if tuple(sorted(labels)) != tuple(sorted(self.label_names)):
            raise _invalid(
                f"metric {name!r} has labels {list(self.label_names)}; every update must "
                f"send exactly those, got {sorted(labels)}", "labels")
        key = tuple(labels[n] for n in self.label_names)
        if key not in self.values and len(self.values) >= MAX_LABEL_SETS:
            raise _invalid(
                f"metric {name!r} already has {MAX_LABEL_SETS} label sets (the cardinality "
                "bound); reuse existing label values instead of ids or timestamps", "labels")
        return key


class CustomMetrics:
    """Named gauges and counters posted to ``POST /metrics/custom``."""

    PREFIX = "troupe_custom_"

    def __init__(self) -> None:
        self.metrics: dict[str, LabelledValues] = {}

    def record(self, name: Any, kind: Any, value: Any, labels: Mapping[str, Any]) -> None:
        if kind not in ("gauge", "counter"):
            raise _invalid(f"kind must be 'gauge' or 'counter', got {kind!r}", "kind")
        if (not isinstance(name, str) or len(name) > MAX_NAME_CHARS
                or not _NAME_RE.match(name)):
            raise _invalid(
                f"metric name {name!r:.120} is not valid: use letters, digits, '_' and ':', "
                f"not starting with a digit, at most {MAX_NAME_CHARS} characters", "name")
        number = check_value(value)
        check_labels(labels)
        base = name
        if kind == "counter":
            if number < 0:
                raise _invalid(f"a counter only goes up: value must be >= 0, got {value!r}",
                               "value")
            base = name.removesuffix("_total")
            if not base:
                raise _invalid("counter name '_total' has nothing before the suffix", "name")
        elif name.endswith("_total"):
            raise _invalid(f"gauge name {name!r} may not end in '_total' (that suffix marks "
                           "counters)", "name")
        metric = self.metrics.get(base)
        if metric is None:
            if len(self.metrics) >= MAX_CUSTOM_METRICS:
                raise _invalid(f"there are already {MAX_CUSTOM_METRICS} custom metrics; "
                               "update an existing one", "name")
            metric = LabelledValues(kind, tuple(sorted(labels)), f"Custom {kind} {base}.")
        elif metric.kind != kind:
            raise _invalid(f"metric {name!r} is a {metric.kind}, not a {kind}", "kind")
        key = metric.slot(name, labels)
        self.metrics[base] = metric
        if kind == "counter":
            metric.values[key] = metric.values.get(key, 0.0) + number
        else:
            metric.values[key] = number

    def families(self) -> Iterator[Metric]:
        for base, metric in sorted(self.metrics.items()):
            cls = CounterMetricFamily if metric.kind == "counter" else GaugeMetricFamily
            family = cls(self.PREFIX + base, metric.help, labels=list(metric.label_names))
            for labels, value in sorted(metric.values.items()):
                family.add_metric(list(labels), value)
            yield family


class Gauges:
    """Built-in gauges reported by many sources (gateway replicas), summed when exposed."""

    def __init__(self, ttl_s: float = GAUGE_TTL_S) -> None:
        self.ttl_s = ttl_s
        self.metrics = {name: LabelledValues("gauge", labels, help_text)
                        for name, (labels, help_text) in BUILTIN_GAUGES.items()}

    def set(self, name: str, labels: Mapping[str, Any], value: Any, source: str) -> None:
        metric = self.metrics.get(name)
        if metric is None:
            raise InvalidRequest(
                f"unknown gauge {name!r}; built-in gauges are {sorted(self.metrics)} "
                "(post other metrics to /metrics/custom)", param="name")
        number = check_value(value)
        check_labels(labels)
        key = metric.slot(name, labels)
        metric.values.setdefault(key, {})[source] = (number, time.monotonic())

    def families(self) -> Iterator[Metric]:
        horizon = time.monotonic() - self.ttl_s
        for name, metric in sorted(self.metrics.items()):
            family = GaugeMetricFamily(f"troupe_{name}", metric.help,
                                       labels=list(metric.label_names))
            per_replica = "replica" in metric.label_names
            for labels, by_source in sorted(metric.values.items()):
                # A source that went quiet (a replica that died) stops counting.
                for source in [s for s, (_, ts) in by_source.items() if ts < horizon]:
                    del by_source[source]
                if per_replica and not by_source:  # a replica that is gone: no series
                    del metric.values[labels]
                    continue
                family.add_metric(list(labels), sum(v for v, _ in by_source.values()))
            yield family

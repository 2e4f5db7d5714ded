"""Usage summaries (``GET /v1/usage``): totals and latency percentiles per group over a
window of the ledger."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

from actors.metrics.aggregates import finite_ms, is_error
from serve_app.protocol.metrics import LedgerEntry

__all__ = ["USAGE_GROUPS", "summarize", "new_usage", "add_usage", "finish_usage", "percentiles"]

USAGE_GROUPS = {"model": "model", "provider": "provider", "key": "key_id", "key_id": "key_id",
                "tier": "tier", "route": "route"}
"""``group_by`` values of :meth:`MetricsActor.usage` -> RequestEvent field."""


def summarize(
    entries: Iterable[LedgerEntry], field: str, key_id: Optional[str] = None
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The totals of ``entries`` and one row per value of the event ``field`` (costliest
    first), counting only ``key_id``'s requests when given."""
    groups: dict[str, dict[str, Any]] = {}
    everything = new_usage()
    for entry in entries:
        if key_id is not None and entry.event.key_id != key_id:
            continue
        key = str(getattr(entry.event, field))
        group = groups.get(key)
        if group is None:
            group = groups[key] = new_usage()
        add_usage(group, entry)
        add_usage(everything, entry)
    rows = [{"group": key, **finish_usage(g)} for key, g in groups.items()]
    rows.sort(key=lambda r: (-r["cost_usd"], -r["requests"], r["group"]))
    return finish_usage(everything), rows


def new_usage() -> dict[str, Any]:
    return {"requests": 0, "errors": 0, "prompt_tokens": 0, "completion_tokens": 0,
            "cost_usd": 0.0, "estimated_entries": 0, "ttft": [], "e2e": [], "ttfa": [],
            "audio_in_s": 0.0, "audio_out_s": 0.0}


def add_usage(acc: dict[str, Any], entry: LedgerEntry) -> None:
    ev = entry.event
    acc["requests"] += 1
    acc["errors"] += is_error(ev.status, ev.error_code)
    acc["prompt_tokens"] += ev.prompt_tokens
    acc["completion_tokens"] += ev.completion_tokens
    acc["cost_usd"] += entry.cost_usd
    acc["estimated_entries"] += entry.cost_estimated
    if finite_ms(ev.ttft_ms):
        acc["ttft"].append(ev.ttft_ms)
    if finite_ms(ev.e2e_ms):
        acc["e2e"].append(ev.e2e_ms)
    if finite_ms(ev.ttfa_ms):
        acc["ttfa"].append(ev.ttfa_ms)
    acc["audio_in_s"] += ev.audio_in_s or 0.0
    acc["audio_out_s"] += ev.audio_out_s or 0.0


def finish_usage(acc: dict[str, Any]) -> dict[str, Any]:
    return {
        "requests": acc["requests"],
        "errors": acc["errors"],
        "prompt_tokens": acc["prompt_tokens"],
        "completion_tokens": acc["completion_tokens"],
        "total_tokens": acc["prompt_tokens"] + acc["completion_tokens"],
        "cost_usd": round(acc["cost_usd"], 9),
        "estimated_entries": acc["estimated_entries"],
        "audio_seconds": {"input": round(acc["audio_in_s"], 3), "output": round(acc["audio_out_s"], 3)},
        "latency_ms": {"ttft": percentiles(acc["ttft"]), "e2e": percentiles(acc["e2e"]),
                       "ttfa": percentiles(acc["ttfa"])},
    }


def percentiles(values: list[float]) -> dict[str, Optional[float]]:
    """Nearest-rank p50/p90/p99 (always an observed value), plus the sample count."""
    values.sort()
    n = len(values)

    def rank(p: float) -> Optional[float]:
        return values[max(0, math.ceil(p / 100.0 * n) - 1)] if n else None

    return {"p50": rank(50), "p90": rank(90), "p99": rank(99), "count": n}

"""Reporting of bench/run_bench.py: medians across rounds and Troupe/baseline ratios, the
Markdown table, the machine's description, and the result files in ``bench/results/``."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from bench.run_bench import Scenario

__all__ = ["RESULTS_DIR", "fmt", "aggregate", "markdown", "collect_env", "write_results"]

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def fmt(v: Optional[float]) -> str:
    if v is None:
        return "—"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.2f}"


def _median(values: list[Optional[float]]) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else None


def aggregate(scenarios: list[Scenario], runs: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (scenario, measure): medians across rounds and Troupe/baseline ratios."""
    rows = []
    for sc in scenarios:
        per_side = runs[sc.key]
        for m in sc.measures:
            values = {side: [m.read(s) for s in per_side[side]] for side in per_side}
            med = {side: _median(v) for side, v in values.items()}
            ratio = paired = None
            if med.get("troupe") is not None and med.get("baseline"):
                ratio = med["troupe"] / med["baseline"]
                pairs = [t / b for t, b in zip(values["troupe"], values["baseline"])
                         if t is not None and b]
                paired = _median(pairs)
            rows.append({
                "scenario": sc.key, "title": sc.title, "measure": m.label, "unit": m.unit,
                "higher_is_better": m.higher_is_better, "values": values, "median": med,
                "ratio": ratio, "paired_ratio_median": paired,
                "errors": {side: sum(s["errors"] for s in per_side[side]) for side in per_side},
            })
    return rows


def markdown(rows: list[dict[str, Any]], env: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [
        (f"# Troupe: metrics + tracing on vs off — {meta['started_at']}" if meta.get("on_vs_off")
         else f"# Troupe vs bare Ray Serve — {meta['started_at']}"),
        "",
        f"mode: {'quick' if meta['quick'] else 'full'}, rounds: {meta['rounds']}, "
        f"RAY_SERVE_THROUGHPUT_OPTIMIZED={env['RAY_SERVE_THROUGHPUT_OPTIMIZED']}, "
        f"cpus: {env['cpu_count']} (Ray num_cpus {env['ray_num_cpus']}), ray {env['ray_version']}, "
        f"python {env['python']}, load avg {env['loadavg_start'][0]:.2f} -> "
        f"{env['loadavg_end'][0]:.2f}",
        "",
        ("Here 'baseline' is Troupe with metrics and tracing off and 'troupe' has them on. "
         if meta.get("on_vs_off") else "")
        + "Medians across rounds. Ratio = Troupe / baseline (ratio of medians; paired = median "
        "of per-round ratios). Lower is better except throughput.",
        "",
        "| scenario | measure | baseline | troupe | troupe/baseline | paired | errors b/t |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = f"×{row['ratio']:.2f}" if row["ratio"] is not None else "—"
        paired = f"×{row['paired_ratio_median']:.2f}" if row["paired_ratio_median"] is not None else "—"
        errs = f"{row['errors'].get('baseline', '—')}/{row['errors'].get('troupe', '—')}"
        better = " ↑" if row["higher_is_better"] else ""
        lines.append(
            f"| ({row['scenario']}) {row['title']} | {row['measure']} ({row['unit']}){better} | "
            f"{fmt(row['median'].get('baseline'))} | {fmt(row['median'].get('troupe'))} | "
            f"{ratio} | {paired} | {errs} |"
        )
    return "\n".join(lines) + "\n"


def collect_env(num_cpus: float, serve_env: dict[str, str]) -> dict[str, Any]:
    import ray
    from ray.serve._private import constants as serve_constants

    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": os.environ.get("RAY_SERVE_THROUGHPUT_OPTIMIZED", "unset"),
        "serve_throughput_optimized_effective": bool(serve_constants.RAY_SERVE_THROUGHPUT_OPTIMIZED),
        "serve_direct_ingress": bool(serve_constants.RAY_SERVE_ENABLE_DIRECT_INGRESS),
        "serve_env": serve_env,
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "ray_num_cpus": num_cpus,
        "ray_version": ray.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()),
    }


def write_results(report: dict[str, Any], md: str, tag: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    stem = RESULTS_DIR / tag
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str))
    stem.with_suffix(".md").write_text(md)
    (RESULTS_DIR / "latest.md").write_text(md)
    (RESULTS_DIR / "latest.json").write_text(json.dumps(report, indent=2, default=str))
    return stem

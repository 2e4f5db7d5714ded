"""The users-run-it benchmark's arithmetic and the idle-CPU accounting (bench/)."""

from __future__ import annotations

import pytest

from bench.idle_cpu import cpu_percent_by_process, label_of
from bench.users_bench import SCENARIOS, SWEEP, aggregate, markdown, ratio


def _round(p50: float, rps: float) -> dict:
    summary = {"e2e_ms": {"p50": p50, "p99": p50 * 2}, "ttft_ms": {"p50": p50},
               "tpot_ms": {"p50": 5.0}, "throughput_rps": rps, "errors": 0}
    return {**{sc.key: summary for sc in SCENARIOS}, **{f"sweep_c{c}": summary for c in SWEEP}}


def test_aggregate_takes_the_median_over_rounds():
    table = aggregate({"troupe": [_round(20, 100), _round(22, 140), _round(30, 120)]})
    row = table["troupe"]
    assert row["unary p50 ms (c=1)"] == 22
    assert row["throughput req/s (c=32)"] == 120
    assert row["sweep p99 c=64"] == 44
    assert row["errors"] == 0


def test_the_report_gives_troupe_over_serve_and_the_fraction_of_uvicorn():
    table = aggregate({"troupe": [_round(18, 150)], "serve": [_round(24, 100)],
                       "uvicorn": [_round(6, 375)]})
    md = markdown(table, {"started": "T", "rounds": 1, "host": "h", "start_s": {},
                          "notes": []})
    assert "| unary p50 ms (c=1) | 18.0 | 24.0 | 6.0 | 0.75 |" in md
    assert "fraction of plain uvicorn's: 0.400" in md


def test_a_missing_number_gives_no_ratio():
    assert ratio(None, 2.0) is None and ratio(1.0, 0.0) is None and ratio(1.0, 2.0) == 0.5


def test_idle_cpu_sums_a_labels_processes_and_counts_new_ones_from_zero():
    before = {1: ("ray::A", 10.0), 2: ("ray::A", 5.0), 3: ("raylet", 1.0)}
    after = {1: ("ray::A", 10.6), 2: ("ray::A", 5.6), 3: ("raylet", 1.0), 4: ("new", 0.3)}
    per = cpu_percent_by_process(before, after, window_s=60.0)
    assert per["ray::A"] == pytest.approx(2.0)  # 1.2 s of CPU over 60 s
    assert per["new"] == pytest.approx(0.5)
    assert per["raylet"] == 0.0
    assert list(per)[0] == "ray::A"  # the costliest first


def test_process_labels_use_rays_proctitle():
    assert label_of(["ray::ServeReplica:troupe:Gateway", ""], "python") == "ray::ServeReplica:troupe:Gateway"
    assert label_of(["/x/bin/raylet", "--flag"], "raylet").startswith("raylet")

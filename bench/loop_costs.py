"""CPU of each of Troupe's own background loops in an idle gateway, measured without Ray.

Every periodic loop a running gateway keeps (key-cache refresh, batch-worker poll, adapter
refresh in the health check, recorder flush, model-state watch) is run here, in this
process, against the SQLite store ``make run`` uses: its CPU per iteration
(``time.process_time``, every thread of this process) times its idle rate gives its share
of one core. Ray's own per-process cost (see ``bench/idle_cpu.py``) is not in these
numbers; the loops that need Ray (Serve's health check RPC, the metrics actor's
``serve.status()`` poll) are listed with their period only.

Run::

    .venv/bin/python -m bench.loop_costs            # writes bench/results/<UTC>-loop-costs.*
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"


async def _per_call_ms(fn: Callable[[], Awaitable[Any]], n: int) -> float:
    await fn()  # warm (connections, statements)
    t0 = time.process_time()
    for _ in range(n):
        await fn()
    return 1000.0 * (time.process_time() - t0) / n


async def _idle_pct(start: Callable[[], Awaitable[Any]], stop: Callable[[], Awaitable[Any]],
                    window_s: float) -> float:
    """CPU of this process while a started loop idles, as % of one core."""
    await start()
    await asyncio.sleep(0.2)
    t0, c0 = time.monotonic(), time.process_time()
    await asyncio.sleep(window_s)
    used, wall = time.process_time() - c0, time.monotonic() - t0
    await stop()
    return 100.0 * used / wall


async def measure(n: int, window_s: float) -> list[dict[str, Any]]:
    from actors.recorder import MetricsRecorder
    from serve_app.gateway.idle import IDLE_POLL_MAX_S
    from serve_app.gateway.model_state import MemoryModelState
    from serve_app.policies.keys import KeyCache
    from serve_app.settings import TroupeSettings
    from serve_app.store import open_store

    settings = TroupeSettings.model_validate({"models": [
        {"id": "m", "engine": {"type": "mock"}}]})
    tmp = tempfile.mkdtemp(prefix="loop-costs-")
    store = open_store(f"sqlite:///{tmp}/troupe.db")
    await store.open()
    keys = KeyCache(store, settings.auth.key_refresh_s)
    now = time.time

    async def batch_poll() -> None:  # BatchRunner.step() with nothing queued
        await store.batch_claim("w", now(), now() + 60, 4)
        await store.batch_webhooks_due(now(), now() + 60, 4)

    state = MemoryModelState(f"{tmp}/model_state.json")
    base = await _idle_pct(lambda: asyncio.sleep(0), lambda: asyncio.sleep(0), window_s)

    async def noop(_batch: Any) -> None:
        return None

    recorder = MetricsRecorder(noop, flush_interval_s=settings.metrics.flush_interval_s)
    rec_idle = await _idle_pct(recorder.start, recorder.close, window_s) - base
    rows: list[tuple[str, float, Optional[float], str]] = [
        ("API-key cache refresh (policies/keys.py)", settings.auth.key_refresh_s,
         await _per_call_ms(keys.refresh, n), "auth.key_refresh_s; one key_list query"),
        ("batch worker poll (gateway/batch.py)", IDLE_POLL_MAX_S,
         await _per_call_ms(batch_poll, n), "backs off from batch.poll_interval_s (1 s) to "
         f"{IDLE_POLL_MAX_S:.0f} s while idle; two queries"),
        ("adapter refresh in the health check (gateway/adapters.py)", 10.0,
         await _per_call_ms(store.adapter_list, n), "Serve's health_check_period_s (10 s)"),
        ("model-state watch (gateway/model_state.py)", 60.0,
         await _per_call_ms(lambda: state.watch(None, 0.0), n),
         "long poll: one answer per change or per 60 s"),
    ]
    out = [{"loop": name, "period_s": period, "cpu_ms_per_run": round(ms, 3),
            "pct_of_one_core": round(ms / 10.0 / period, 4), "note": note}
           for name, period, ms, note in rows if ms is not None]
    out.append({"loop": "metrics recorder flush (actors/recorder.py)", "period_s": None,
                "cpu_ms_per_run": None, "pct_of_one_core": round(max(0.0, rec_idle), 4),
                "note": f"flushes every {settings.metrics.flush_interval_s} s only while "
                        "events wait; measured idle over the window"})
    out.append({"loop": "rate-limit usage flush (policies/ratelimit.py)", "period_s": None,
                "cpu_ms_per_run": None, "pct_of_one_core": 0.0,
                "note": "runs 0.5 s after a rate-limited request only; never while idle"})
    out.append({"loop": "metrics actor: serve.status() poll (actors/metrics/actor.py)",
                "period_s": settings.metrics.serve_poll_interval_s, "cpu_ms_per_run": None,
                "pct_of_one_core": None,
                "note": "needs Ray: see the MetricsActor rows of bench/idle_cpu.py"})
    await store.close()
    return out


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Troupe's background loops, idle cost (no Ray; SQLite store, no keys)", "",
             "| loop | period s | CPU ms per run | % of one core | note |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['loop']} | {r['period_s'] if r['period_s'] is not None else '-'} | "
                     f"{r['cpu_ms_per_run'] if r['cpu_ms_per_run'] is not None else '-'} | "
                     f"{r['pct_of_one_core'] if r['pct_of_one_core'] is not None else '-'} | "
                     f"{r['note']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loop_costs",
                                description=__doc__.split("\n")[0])
    p.add_argument("-n", type=int, default=300, help="runs per loop body")
    p.add_argument("--window", type=float, default=5.0, help="idle seconds for the recorder")
    args = p.parse_args(argv)
    rows = asyncio.run(measure(args.n, args.window))
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{stamp}-loop-costs"
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    md = markdown(rows)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

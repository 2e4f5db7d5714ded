"""Does a model computing inside the gateway hurt the gateway's other requests? (issue 20)

``config/local.yaml`` hosts every bundled model in the gateway replica. The text engine
decodes in its own thread, but that thread shares the gateway process (and Python's GIL)
with the request path. This starts ``troupe run CONFIG`` for each config given (each in its
own Ray instance, one after the other) and measures, while idle and while ``--streams``
SmolLM2 streams generate: p50/p90 of unary mock chat requests (the gateway's own path) and
of one-sentence MiniLM embeddings, sequential, ``--n`` each. It reports each p50 under load
and its ratio to the same config's idle p50, per config.

Run::

    .venv/bin/python -m bench.fold_latency --config config/local-replicas.yaml \\
        --config config/local.yaml

Results: ``bench/results/<UTC>-fold-latency.json`` / ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

import httpx

from bench.idle_cpu import _first_text_model, _troupe_command, wait_healthy
from bench.users_systems import RunningSystem, SystemSpec

__all__ = ["main"]

RESULTS = Path(__file__).resolve().parent / "results"


async def _timed(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> float:
    began = time.perf_counter()
    r = await client.post(path, json=body)
    r.raise_for_status()
    return (time.perf_counter() - began) * 1000.0


async def _series(client: httpx.AsyncClient, n: int, mock: str) -> dict[str, list[float]]:
    chat = {"model": mock, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    emb = {"model": "all-minilm-l6-v2", "input": "The quick brown fox jumps over the dog."}
    out: dict[str, list[float]] = {"mock_chat_ms": [], "embeddings_ms": []}
    for _ in range(n):
        out["mock_chat_ms"].append(await _timed(client, "/v1/chat/completions", chat))
        out["embeddings_ms"].append(await _timed(client, "/v1/embeddings", emb))
    return out


async def _stream(client: httpx.AsyncClient, stop: asyncio.Event, tokens: list[int]) -> None:
    body = {"model": "smollm2-135m", "stream": True, "max_tokens": 96, "temperature": 0.8,
            "messages": [{"role": "user", "content": "Tell me a long story about a ship."}]}
    while not stop.is_set():
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    tokens[0] += 1


def _summary(series: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out = {}
    for name, values in series.items():
        values = sorted(values)
        out[name] = {"p50": round(statistics.median(values), 2),
                     "p90": round(values[int(0.9 * (len(values) - 1))], 2)}
    return out


async def _measure(url: str, mock: str, n: int, streams: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        await _series(client, 5, mock)  # warm both paths
        idle = _summary(await _series(client, n, mock))
        stop, tokens = asyncio.Event(), [0]
        tasks = [asyncio.create_task(_stream(client, stop, tokens)) for _ in range(streams)]
        await asyncio.sleep(3.0)  # the streams are decoding before the timed series
        began, before = time.monotonic(), tokens[0]
        loaded = _summary(await _series(client, n, mock))
        rate = (tokens[0] - before) / (time.monotonic() - began)
        stop.set()
        await asyncio.gather(*tasks)
    ratios = {k: round(loaded[k]["p50"] / idle[k]["p50"], 2) for k in idle}
    return {"idle": idle, "under_llm_load": loaded, "p50_ratio_loaded_to_idle": ratios,
            "llm_stream_chunks_per_s": round(rate, 1)}


def measure(config: Path, n: int, streams: int) -> dict[str, Any]:
    spec = SystemSpec("fold-latency", _troupe_command(config), model=_first_text_model(config),
                      ready_timeout_s=600.0)
    log_dir = Path(f"/tmp/fold-latency-{int(time.time())}")
    log_dir.mkdir(exist_ok=True)
    system = RunningSystem(spec, 0, log_dir)
    try:
        system.start()
        base = f"http://127.0.0.1:{system.port}"
        wait_healthy(system.port, 600.0)
        return asyncio.run(_measure(base, spec.model, n, streams))
    finally:
        system.stop()


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# Gateway latency while SmolLM2 streams ({report['streams']} streams)", "",
             f"{report['n']} sequential requests per series; ms.", "",
             "| config | request | idle p50 | loaded p50 | loaded p90 | p50 ratio | LLM chunks/s |",
             "|---|---|---|---|---|---|---|"]
    for config, r in report["configs"].items():
        for name in r["idle"]:
            lines.append(
                f"| `{config}` | {name} | {r['idle'][name]['p50']} | "
                f"{r['under_llm_load'][name]['p50']} | {r['under_llm_load'][name]['p90']} | "
                f"{r['p50_ratio_loaded_to_idle'][name]} | {r['llm_stream_chunks_per_s']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", action="append", required=True)
    p.add_argument("--n", type=int, default=60, help="requests per timed series")
    p.add_argument("--streams", type=int, default=4, help="concurrent SmolLM2 streams")
    args = p.parse_args(argv)
    report = {"n": args.n, "streams": args.streams,
              "configs": {c: measure(Path(c), args.n, args.streams) for c in args.config}}
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    stem = RESULTS / f"{stamp}-fold-latency"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    md = markdown(report)
    stem.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())

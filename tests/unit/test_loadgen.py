"""bench/loadgen.py: the tokens/s counted over the window in which every user sends."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
from aiohttp import web

from bench.loadgen import LoadSpec, RequestResult, _arrivals, run_load, summarize, window_tokens_per_s


def test_arrivals_share_the_tokens_by_characters() -> None:
    shares = _arrivals([1.0, 2.0, 3.0], [2, 4, 2], 16)
    assert [t for t, _ in shares] == [1.0, 2.0, 3.0]
    assert [n for _, n in shares] == [4.0, 8.0, 4.0]
    assert _arrivals([1.0], [0], 5) == []


def test_window_counts_only_chunks_inside_it_from_successful_requests() -> None:
    early = RequestResult(True, 200, 1.0, arrivals=[(10.0, 5.0), (11.0, 5.0)])
    late = RequestResult(True, 200, 1.0, arrivals=[(19.0, 3.0), (21.0, 7.0)])  # ends after the window
    failed = RequestResult(False, 500, 1.0, arrivals=[(12.0, 100.0)])
    assert window_tokens_per_s([early, late, failed], 10.0, 20.0) == pytest.approx(13 / 10)
    assert math.isnan(window_tokens_per_s([early], 5.0, 5.0))


def _sse_app(chunks: int, gap_s: float) -> web.Application:
    """A loopback chat-completions stream: ``chunks`` one-token chunks ``gap_s`` apart."""

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        assert body["stream_options"] == {"include_usage": True}
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(chunks):
            await asyncio.sleep(gap_s)
            event = {"choices": [{"index": 0, "delta": {"content": f"t{i % 10}"}}]}
            await resp.write(f"data: {json.dumps(event)}\n\n".encode())
        usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": chunks}}
        await resp.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    return app


async def test_run_load_window_excludes_the_tail_after_the_deadline() -> None:
    """Each request streams 10 tokens over at least 0.5 s and the loop's deadline is 0.75 s,
    so the last request of each user is still streaming at the deadline (however slow the
    machine): the window counts only the tokens that arrived by then."""
    runner = web.AppRunner(_sse_app(chunks=10, gap_s=0.05))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        spec = LoadSpec(f"http://127.0.0.1:{port}/v1/chat/completions", concurrency=2,
                        max_requests=10, duration_s=0.75, request_timeout_s=10)
        window: list[float] = []
        results, wall = await run_load(spec, window)
    finally:
        await runner.cleanup()
    start, deadline = window
    assert deadline - start == pytest.approx(0.75)
    assert results and all(r.ok and r.completion_tokens == 10 and len(r.arrivals) == 10 for r in results)
    total = sum(n for r in results for _, n in r.arrivals)
    assert total == pytest.approx(10 * len(results))
    inside = sum(n for r in results for t, n in r.arrivals if t <= deadline)
    assert 0 < inside < total  # the tail after the deadline is left out
    assert window_tokens_per_s(results, start, deadline) == pytest.approx(inside / 0.75)
    assert wall > 0.75
    assert summarize(results, wall)["output_tokens_per_s"] == pytest.approx(total / wall)

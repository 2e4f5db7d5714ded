"""A closed-loop asyncio load generator for OpenAI chat-completions endpoints.

``concurrency`` workers each send one request, wait for it to finish, and send the next,
until ``max_requests`` have been sent or ``duration_s`` has passed (whichever comes first;
both are bounds, so a run always stops by itself). Requests in flight at the deadline are
allowed to finish, bounded by ``request_timeout_s``.

Per request it measures:

* ``e2e``: from just before the POST to the end of the body (``[DONE]`` for streams);
* ``ttft`` (streams): until the first chunk whose delta carries non-empty ``content``;
* ``tpot`` (streams): time per output token after the first,
  ``(e2e - ttft) / (completion_tokens - 1)``, with ``completion_tokens`` from the final
  usage chunk (the request asks for ``stream_options.include_usage``);
* ``itl`` (streams): inter-token latencies. Each gap between two content-bearing chunks is
  split evenly over the tokens the later chunk carries. The OpenAI wire does not say how
  many tokens a chunk holds, so the count is estimated from the chunk's share of the
  response's characters, scaled so the chunks add up to ``completion_tokens``. When a
  server merges tokens (a lagging consumer), this keeps ITL comparable to TPOT instead of
  showing one long gap.

Throughput: ``output_tokens_per_s`` is every finished request's tokens over the run's wall
time, requests in flight at the deadline included. When one request takes a sizeable share
of the duration, that figure moves in steps with the request time: a user whose last
request ends just after the deadline sends no further one, and one whose request ends just
before sends another and holds the wall time open while it runs alone. Against
``vllm serve`` at c=16 (64-token answers of about 3.8 s in a 12 s loop), a 3% longer
request cost a 12% lower figure. :func:`window_tokens_per_s` counts instead the tokens that
arrived between the start and the deadline, while every user was still sending, over that
window; each streamed chunk's tokens are estimated as for ``itl``.

A request is an error when the status is not 200, the connection fails, it times out, a
stream ends without ``[DONE]``, or a stream carries an ``error`` object.

CLI::

    .venv/bin/python -m bench.loadgen --url http://127.0.0.1:8000/v1/chat/completions \\
        --model mock-5ms --stream -c 16 -n 200 -t 30 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import aiohttp

try:  # the client's own parsing cost is the same for both sides; keep it small anyway
    import orjson

    _loads = orjson.loads
    _dumps = orjson.dumps
except ImportError:  # pragma: no cover
    _loads = json.loads

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj).encode()


__all__ = ["LoadSpec", "RequestResult", "run_load", "summarize", "window_tokens_per_s", "percentile",
           "main"]

DEFAULT_PROMPT = "Tell the troupe a short story about ray serve replicas."


@dataclass
class LoadSpec:
    """What to send, how hard, and for how long."""

    url: str
    model: str = "mock-5ms"
    stream: bool = True
    concurrency: int = 1
    max_requests: int = 100
    duration_s: float = 30.0
    max_tokens: int = 64
    temperature: float = 0.0
    prompt: str = DEFAULT_PROMPT
    headers: dict[str, str] = field(default_factory=dict)
    request_timeout_s: float = 60.0
    #: More request fields (e.g. ``tools``), merged into every body.
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.max_requests < 1 or self.duration_s <= 0:
            raise ValueError("concurrency, max_requests and duration_s must be positive")
        if not self.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
            raise ValueError(f"refusing to send load anywhere but loopback: {self.url}")


@dataclass
class RequestResult:
    """One request's measurements (seconds)."""

    ok: bool
    status: int
    e2e_s: float
    ttft_s: Optional[float] = None
    tpot_s: Optional[float] = None
    prompt_tokens: Optional[int] = None
    completion_tokens: Optional[int] = None
    content_chunks: int = 0
    itl_s: list[float] = field(default_factory=list)
    error: Optional[str] = None
    #: Streams: each content chunk's arrival (``time.perf_counter()``) and its estimated
    #: tokens (see the module docstring), for :func:`window_tokens_per_s`.
    arrivals: list[tuple[float, float]] = field(default_factory=list)


def _payload(spec: LoadSpec, index: int) -> bytes:
    body: dict[str, Any] = {
        "model": spec.model,
        "messages": [{"role": "user", "content": f"{spec.prompt} #{index}"}],
        "max_tokens": spec.max_tokens,
        "temperature": spec.temperature,
        "stream": spec.stream,
    }
    if spec.stream:
        body["stream_options"] = {"include_usage": True}
    body.update(spec.extra_body)
    return _dumps(body)


def _itl_samples(times: list[float], sizes: list[int], completion_tokens: int) -> list[float]:
    """Per-token gaps: chunk gap / estimated tokens in that chunk (see module docstring)."""
    total_chars = sum(sizes)
    if len(times) < 2 or total_chars == 0 or completion_tokens < 1:
        return []
    scale = completion_tokens / total_chars
    samples: list[float] = []
    for i in range(1, len(times)):
        tokens = max(1, round(sizes[i] * scale))
        gap = (times[i] - times[i - 1]) / tokens
        samples.extend([gap] * tokens)
    return samples


def _arrivals(times: list[float], sizes: list[int], completion_tokens: int) -> list[tuple[float, float]]:
    """Each chunk's arrival and its share of ``completion_tokens`` (by characters): the
    shares add up to ``completion_tokens``."""
    total_chars = sum(sizes)
    if total_chars == 0:
        return []
    return [(t, completion_tokens * size / total_chars) for t, size in zip(times, sizes)]


def window_tokens_per_s(results: list[RequestResult], start: float, end: float) -> float:
    """Output tokens/s of the successful streams over ``[start, end]`` (``perf_counter``
    times; for :func:`run_load`, its start and deadline): each chunk counts when it
    arrived (see the module docstring)."""
    if end <= start:
        return math.nan
    tokens = sum(n for r in results if r.ok for t, n in r.arrivals if start <= t <= end)
    return tokens / (end - start)


async def _read_stream(resp: aiohttp.ClientResponse, t0: float) -> RequestResult:
    times: list[float] = []
    sizes: list[int] = []
    usage: Optional[dict[str, Any]] = None
    done = False
    async for line in resp.content:
        now = time.perf_counter()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            done = True
            break
        obj = _loads(data)
        if "error" in obj:
            return RequestResult(False, resp.status, now - t0, error=f"stream error: {obj['error']}")
        for choice in obj.get("choices") or ():
            content = (choice.get("delta") or {}).get("content")
            if content:
                times.append(now)
                sizes.append(len(content))
        if obj.get("usage"):
            usage = obj["usage"]
    end = time.perf_counter()
    if not done:
        return RequestResult(False, resp.status, end - t0, error="stream ended without [DONE]")
    if not times:
        return RequestResult(False, resp.status, end - t0, error="stream carried no content")
    result = RequestResult(True, resp.status, end - t0, ttft_s=times[0] - t0)
    result.content_chunks = len(times)
    if usage is not None:
        result.prompt_tokens = usage.get("prompt_tokens")
        result.completion_tokens = usage.get("completion_tokens")
    if result.completion_tokens:
        if result.completion_tokens > 1:
            result.tpot_s = (result.e2e_s - result.ttft_s) / (result.completion_tokens - 1)
        result.itl_s = _itl_samples(times, sizes, result.completion_tokens)
        result.arrivals = _arrivals(times, sizes, result.completion_tokens)
    return result


async def _one_request(session: aiohttp.ClientSession, spec: LoadSpec, index: int) -> RequestResult:
    payload = _payload(spec, index)
    t0 = time.perf_counter()
    try:
        async with session.post(spec.url, data=payload) as resp:
            if resp.status != 200:
                text = (await resp.text())[:300]
                return RequestResult(False, resp.status, time.perf_counter() - t0,
                                     error=f"HTTP {resp.status}: {text}")
            if spec.stream:
                return await _read_stream(resp, t0)
            body = await resp.read()
            e2e = time.perf_counter() - t0
            obj = _loads(body)
            usage = obj.get("usage") or {}
            return RequestResult(True, resp.status, e2e,
                                 prompt_tokens=usage.get("prompt_tokens"),
                                 completion_tokens=usage.get("completion_tokens"))
    except asyncio.TimeoutError:
        return RequestResult(False, 0, time.perf_counter() - t0, error="timeout")
    except (aiohttp.ClientError, ValueError) as exc:
        return RequestResult(False, 0, time.perf_counter() - t0,
                             error=f"{type(exc).__name__}: {exc}"[:300])


async def run_load(spec: LoadSpec, window: Optional[list[float]] = None) -> tuple[list[RequestResult], float]:
    """Run the closed loop; returns the results and the wall time it took (seconds).
    ``window``: a list that gets the loop's start and deadline (``perf_counter``), for
    :func:`window_tokens_per_s`."""
    headers = {"Content-Type": "application/json", **spec.headers}
    connector = aiohttp.TCPConnector(limit=spec.concurrency, ttl_dns_cache=300)
    timeout = aiohttp.ClientTimeout(total=spec.request_timeout_s)
    results: list[RequestResult] = []
    issued = 0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout, headers=headers) as session:
        start = time.perf_counter()
        deadline = start + spec.duration_s
        if window is not None:
            window[:] = [start, deadline]

        async def worker() -> None:
            nonlocal issued
            while issued < spec.max_requests and time.perf_counter() < deadline:
                index = issued
                issued += 1
                results.append(await _one_request(session, spec, index))

        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))
        wall = time.perf_counter() - start
    return results, wall


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default) of an already sorted list."""
    if not sorted_values:
        return math.nan
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _dist_ms(values: list[float]) -> Optional[dict[str, float]]:
    if not values:
        return None
    s = sorted(values)
    return {
        "p50": percentile(s, 50) * 1000,
        "p90": percentile(s, 90) * 1000,
        "p99": percentile(s, 99) * 1000,
        "mean": sum(s) / len(s) * 1000,
        "n": len(s),
    }


def summarize(results: list[RequestResult], wall_s: float) -> dict[str, Any]:
    """Aggregate a run: percentiles in milliseconds, throughput in requests per second."""
    ok = [r for r in results if r.ok]
    errors = [r for r in results if not r.ok]
    out_tokens = sum(r.completion_tokens or 0 for r in ok)
    chunks = sum(r.content_chunks for r in ok)
    return {
        "requests": len(results),
        "ok": len(ok),
        "errors": len(errors),
        "error_samples": sorted({r.error or "" for r in errors})[:5],
        "wall_s": wall_s,
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else math.nan,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else math.nan,
        "e2e_ms": _dist_ms([r.e2e_s for r in ok]),
        "ttft_ms": _dist_ms([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_ms": _dist_ms([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_ms": _dist_ms([g for r in ok for g in r.itl_s]),
        "tokens_per_chunk": (out_tokens / chunks) if chunks else None,
        "missing_usage": sum(1 for r in ok if r.completion_tokens is None),
    }


def _parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n")[0])
    p.add_argument("--url", required=True, help="chat-completions URL on loopback")
    p.add_argument("--model", default="mock-5ms")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--stream", dest="stream", action="store_true", default=True)
    mode.add_argument("--unary", dest="stream", action="store_false")
    p.add_argument("-c", "--concurrency", type=int, default=1)
    p.add_argument("-n", "--max-requests", type=int, default=100)
    p.add_argument("-t", "--duration", type=float, default=30.0, help="seconds (a bound)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--api-key", default=None, help="sent as Authorization: Bearer")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout (s)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--raw", action="store_true", help="with --json, include every request")
    return p.parse_args(argv)


def _print_summary(s: dict[str, Any]) -> None:
    print(f"requests {s['requests']}  ok {s['ok']}  errors {s['errors']}  "
          f"wall {s['wall_s']:.2f}s  throughput {s['throughput_rps']:.1f} req/s  "
          f"{s['output_tokens_per_s']:.0f} tok/s")
    for key in ("e2e_ms", "ttft_ms", "tpot_ms", "itl_ms"):
        d = s[key]
        if d:
            print(f"  {key:8s} p50 {d['p50']:8.2f}  p90 {d['p90']:8.2f}  p99 {d['p99']:8.2f}  "
                  f"mean {d['mean']:8.2f}  (n={d['n']})")
    for err in s["error_samples"]:
        print(f"  error: {err}")


def main(argv: Optional[list[str]] = None) -> int:
    args = _parse_args(argv)
    spec = LoadSpec(
        url=args.url, model=args.model, stream=args.stream, concurrency=args.concurrency,
        max_requests=args.max_requests, duration_s=args.duration, max_tokens=args.max_tokens,
        temperature=args.temperature, request_timeout_s=args.timeout,
        headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {},
    )
    results, wall = asyncio.run(run_load(spec))
    summary = summarize(results, wall)
    if args.json:
        if args.raw:
            summary["results"] = [asdict(r) for r in results]
        print(json.dumps(summary, indent=2))
    else:
        _print_summary(summary)
    return 0 if summary["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())

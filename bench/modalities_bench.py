"""Modality benchmarks: embeddings batching through Troupe vs bare Ray Serve, TTS and ASR
real-time factors, on the bundled CPU models.

* Embeddings: 32 concurrent closed-loop clients, each sending one sentence per request,
  against (a) Troupe's ``POST /v1/embeddings`` on all-MiniLM-L6-v2, where the gateway
  merges concurrent requests into batch calls to the model deployment, one forward pass
  each; (b) a bare Ray Serve app of the same topology (FastAPI ingress -> handle -> model
  deployment) and (c) a bare Serve deployment holding the model itself (proxy -> replica),
  both with the same model and resources, encoding each request on its own. All run in
  one Ray/Serve instance; rounds rotate the order. Plus the in-process batch-of-32 rate.
* TTS: the Piper voice's real-time factor (synthesis time / audio time) in process.
* ASR: Whisper tiny.en's real-time factor on that speech, in process.

Run (under the shared Ray lock on a shared machine)::

    python -m bench.modalities_bench            # about 4 minutes
    python -m bench.modalities_bench --seconds 10 --rounds 1

Writes ``bench/results/<UTC>-modalities.json`` and ``.md``.
"""

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from fastapi import FastAPI, Request

from bench.run_bench import _free_port, prepare_environment, start_ray

RESULTS = Path(__file__).resolve().parent / "results"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply this morning.",
    "Ray Serve batches requests across callers.",
    "She plays the violin every evening.",
    "Cloud computing changed how software ships.",
    "The weather will be sunny and warm tomorrow.",
    "Embeddings map sentences to vectors.",
]
PARAGRAPH = (
    "Troupe serves five modalities from one gateway. This paragraph measures how fast the "
    "bundled voice speaks on a small CPU. Each sentence is synthesized on its own, so the "
    "first audio arrives early. Whisper then transcribes the result back to text. The ratio "
    "of compute time to audio time is the real-time factor."
)
NUM_CPUS_MODEL = 0.25  # logical: three apps and the actors fit in num_cpus=2


# ------------------------------------------------------------------ the bare baseline


class BareEmbedder:
    """The same MiniLM, one forward pass per request (no cross-request batching)."""

    def __init__(self) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        from deployments.engines.sentence_transformers_engine import bundled_minilm_path

        torch.set_num_threads(1)
        self.model = SentenceTransformer(bundled_minilm_path(), device="cpu")

    async def embed(self, texts: list[str]) -> list[list[float]]:
        vectors = await asyncio.to_thread(
            self.model.encode, texts, normalize_embeddings=True, show_progress_bar=False
        )
        return vectors.tolist()


def build_bare_app() -> Any:
    from ray import serve

    app = FastAPI()

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
    @serve.ingress(app)
    class BareIngress:
        def __init__(self, model: Any) -> None:
            self.model = model

        @app.post("/v1/embeddings")
        async def embeddings(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            vectors = await self.model.embed.remote(texts)
            return {"object": "list", "model": body["model"],
                    "data": [{"object": "embedding", "index": i, "embedding": v}
                             for i, v in enumerate(vectors)]}

    model = serve.deployment(BareEmbedder).options(
        name="BareEmbedder", max_ongoing_requests=64, ray_actor_options={"num_cpus": NUM_CPUS_MODEL}
    )
    return BareIngress.bind(model.bind())


def build_bare_single_app() -> Any:
    """The leanest bare Serve: one FastAPI deployment that holds the model itself (proxy ->
    replica, no second hop), one forward pass per request."""
    from ray import serve

    app = FastAPI()

    @serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": NUM_CPUS_MODEL})
    @serve.ingress(app)
    class BareSingle:
        def __init__(self) -> None:
            self.model = BareEmbedder()

        @app.post("/v1/embeddings")
        async def embeddings(self, request: Request) -> dict[str, Any]:
            body = await request.json()
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            vectors = await self.model.embed(texts)
            return {"object": "list", "model": body["model"],
                    "data": [{"object": "embedding", "index": i, "embedding": v}
                             for i, v in enumerate(vectors)]}

    return BareSingle.bind()


def troupe_args(state_dir: str) -> dict[str, Any]:
    return {
        "models": [{
            "id": "all-minilm-l6-v2", "modality": "embeddings",
            "engine": {"type": "sentence-transformers", "num_threads": 1,
                       "max_batch_size": 32, "batch_wait_timeout_s": 0.005},
            "deployment": {"max_ongoing_requests": 64,
                           "ray_actor_options": {"num_cpus": NUM_CPUS_MODEL}},
        }],
        "gateway": {"ray_actor_options": {"num_cpus": 0.25}},
        "metrics": {"store_url": "sqlite:///" + os.path.join(state_dir, "ledger.db").lstrip("/")},
    }


# ----------------------------------------------------------------------- load


async def closed_loop(url: str, concurrency: int, seconds: float) -> dict[str, Any]:
    """``concurrency`` clients, each sending one sentence per request, back to back."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        n = 0
        while time.perf_counter() < stop_at:
            body = {"model": "all-minilm-l6-v2", "input": SENTENCES[(i + n) % len(SENTENCES)],
                    "encoding_format": "float"}
            t0 = time.perf_counter()
            async with session.post(url, json=body) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    if errors == 1:
                        print("first error:", r.status, (await r.text())[:300], flush=True)
                    continue
            latencies.append(time.perf_counter() - t0)
            n += 1

    started = time.perf_counter()
    conn = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=conn) as session:
        await asyncio.gather(*(client(i, session) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies), "errors": errors, "seconds": round(elapsed, 2),
        "req_per_s": round(len(latencies) / elapsed, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 1) if latencies else None,
    }


async def handle_closed_loop(make_call: Any, concurrency: int, seconds: float) -> dict[str, Any]:
    """The same load, sent by the driver straight to the model deployment's handle
    (no HTTP proxy, no ingress): what the model deployment itself sustains."""
    latencies: list[float] = []
    stop_at = time.perf_counter() + seconds

    async def client(i: int) -> None:
        n = 0
        while time.perf_counter() < stop_at:
            t0 = time.perf_counter()
            await make_call(SENTENCES[(i + n) % len(SENTENCES)], f"{i}-{n}")
            latencies.append(time.perf_counter() - t0)
            n += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {"requests": len(latencies), "seconds": round(elapsed, 2),
            "req_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": round(1000 * latencies[len(latencies) // 2], 1)}


def troupe_stats() -> dict[str, Any]:
    """The Troupe embeddings replica's counters (called in a loop: with direct ingress,
    handles only work inside one)."""
    from ray import serve

    async def get() -> dict[str, Any]:
        handle = serve.get_deployment_handle("Embeddings_all-minilm-l6-v2", app_name="troupe")
        return await handle.stats.remote()

    return asyncio.run(get())


def handle_runs(rounds: int, concurrency: int, seconds: float) -> dict[str, Any]:
    from ray import serve

    from serve_app.protocol.modalities import EmbeddingRequest

    troupe = serve.get_deployment_handle("Embeddings_all-minilm-l6-v2", app_name="troupe")
    bare = serve.get_deployment_handle("BareEmbedder", app_name="bare")

    async def call_troupe(text: str, rid: str) -> Any:
        return await troupe.embed.remote(EmbeddingRequest(rid, [text]))

    async def call_bare(text: str, rid: str) -> Any:
        return await bare.embed.remote([text])

    calls = {"troupe": call_troupe, "bare": call_bare}
    runs: dict[str, list[dict[str, Any]]] = {"troupe": [], "bare": []}
    for r in range(rounds):
        for side in (["troupe", "bare"] if r % 2 == 0 else ["bare", "troupe"]):
            res = asyncio.run(handle_closed_loop(calls[side], concurrency, seconds))
            runs[side].append(res)
            print("handle", side, res, flush=True)
    stats = troupe_stats()
    med = {s: round(statistics.median(x["req_per_s"] for x in v), 1) for s, v in runs.items()}
    return {"runs": runs, "troupe_req_per_s": med["troupe"], "bare_req_per_s": med["bare"],
            "speedup": round(med["troupe"] / med["bare"], 2) if med["bare"] else None,
            "troupe_largest_batch": stats.get("largest_batch")}


def in_process_batch32() -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    from deployments.engines.sentence_transformers_engine import bundled_minilm_path

    torch.set_num_threads(1)
    model = SentenceTransformer(bundled_minilm_path(), device="cpu")
    batch = [SENTENCES[i % len(SENTENCES)] for i in range(32)]
    model.encode(batch, batch_size=32)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        model.encode(batch, batch_size=32, normalize_embeddings=True, show_progress_bar=False)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"batch_ms_best_of_5": round(best * 1000, 1), "sentences_per_s": round(32 / best, 1),
            "threads": 1}


async def speech_rtfs() -> dict[str, Any]:
    import numpy as np

    from deployments.engines.piper_tts import PiperEngine
    from deployments.engines.whisper_asr import FasterWhisperEngine
    from serve_app.settings.modality import FasterWhisperEngineConfig, PiperEngineConfig

    tts = PiperEngine("piper", PiperEngineConfig(num_threads=1))
    asr = FasterWhisperEngine("whisper", FasterWhisperEngineConfig(num_threads=1))
    await tts.start()
    await asr.start()
    tts_runs, asr_runs = [], []
    audio = np.zeros(0, dtype=np.float32)
    first_audio = []
    for _ in range(2):
        t0 = time.perf_counter()
        blocks = []
        async for block in tts.synthesize(PARAGRAPH, "joe", 1.0):
            if not blocks:
                first_audio.append(time.perf_counter() - t0)
            blocks.append(block)
        tts_runs.append(time.perf_counter() - t0)
        audio = np.concatenate(blocks)
    seconds = audio.size / tts.sample_rate
    audio16 = np.interp(np.arange(int(seconds * 16000)) / 16000,
                        np.arange(audio.size) / tts.sample_rate, audio).astype(np.float32)
    text = ""
    for _ in range(2):
        t0 = time.perf_counter()
        text = (await asr.transcribe(audio16, "en", None, 0.0)).text
        asr_runs.append(time.perf_counter() - t0)
    return {
        "audio_seconds": round(seconds, 2),
        "tts_seconds_best": round(min(tts_runs), 2),
        "tts_rtf": round(min(tts_runs) / seconds, 3),
        "tts_first_audio_s": round(min(first_audio), 3),
        "asr_seconds_best": round(min(asr_runs), 2),
        "asr_rtf": round(min(asr_runs) / seconds, 3),
        "asr_text": text,
        "threads": 1,
    }


# ------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="Load time per run.")
    parser.add_argument("--rounds", type=int, default=2, help="Runs per side (alternating).")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--num-cpus", type=float, default=2)
    parser.add_argument("--throughput-optimized", action="store_true",
                        help="RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (direct ingress) for both sides.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    prepare_environment(args.throughput_optimized)
    import ray
    from ray import serve

    from serve_app.build.app import build_app

    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "args": vars(args), "host": platform.node(),
                              "load_avg_at_start": os.getloadavg()}
    start_ray(args.num_cpus)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        state = tempfile.mkdtemp(prefix="troupe-bench-mod-")
        serve.run(build_app(troupe_args(state)), name="troupe", route_prefix="/troupe")
        serve.run(build_bare_app(), name="bare", route_prefix="/bare")
        serve.run(build_bare_single_app(), name="bare1", route_prefix="/bare1")
        sides = ["troupe", "bare", "bare1"]
        urls = {side: f"http://127.0.0.1:{port}/{side}/v1/embeddings" for side in sides}
        for url in urls.values():  # warm-up
            asyncio.run(closed_loop(url, 8, 2.0))
        before = troupe_stats()
        runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
        for r in range(args.rounds):
            order = sides[r % len(sides):] + sides[: r % len(sides)]  # rotate who goes first
            for side in order:
                res = asyncio.run(closed_loop(urls[side], args.concurrency, args.seconds))
                runs[side].append(res)
                print(side, res, flush=True)
        report["embeddings_runs"] = runs
        med = {s: round(statistics.median(x["req_per_s"] for x in v), 1) for s, v in runs.items()}
        p50 = {s: round(statistics.median(x["p50_ms"] or 0 for x in v), 1) for s, v in runs.items()}
        http_batch = troupe_stats()
        passes = http_batch["forward_passes"] - before["forward_passes"]
        served = http_batch["batched_requests"] - before["batched_requests"]
        report["embeddings"] = {
            "troupe_largest_batch": http_batch.get("largest_batch"),
            "troupe_mean_batch": round(served / passes, 1) if passes else None,
            "troupe_req_per_s": med["troupe"], "bare_req_per_s": med["bare"],
            "bare1_req_per_s": med["bare1"],
            "speedup": round(med["troupe"] / med["bare"], 2) if med["bare"] else None,
            "speedup_vs_single": round(med["troupe"] / med["bare1"], 2) if med["bare1"] else None,
            "troupe_p50_ms": p50["troupe"], "bare_p50_ms": p50["bare"], "bare1_p50_ms": p50["bare1"],
        }
        report["embeddings_handle"] = handle_runs(args.rounds, args.concurrency, args.seconds)
    finally:
        serve.shutdown()
        ray.shutdown()
    report["embeddings_in_process_batch32"] = in_process_batch32()
    report["speech"] = asyncio.run(speech_rtfs())
    report["load_avg_at_end"] = os.getloadavg()
    print(json.dumps({k: report[k] for k in ("embeddings", "embeddings_handle")}, indent=2))
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + ("-tpo" if args.throughput_optimized else "")
    (RESULTS / f"{stamp}-modalities.json").write_text(json.dumps(report, indent=2))
    e, b, s = report["embeddings"], report["embeddings_in_process_batch32"], report["speech"]
    h = report["embeddings_handle"]
    md = f"""# Modality benchmarks ({report['started']})

Machine: {report['host']}, Ray num_cpus={args.num_cpus}, RAY_SERVE_THROUGHPUT_OPTIMIZED={int(args.throughput_optimized)}, load average at start {report['load_avg_at_start'][0]:.1f}
(shared 2-core machine). Every model pinned to 1 thread.

## Embeddings: {args.concurrency} concurrent single-sentence requests, all-MiniLM-L6-v2 on CPU

| side | req/s (median of {args.rounds}) | p50 ms | Troupe / this |
|---|---|---|---|
| Troupe `/v1/embeddings`: the gateway merges concurrent requests into batch calls (up to 32 inputs, 2 in flight), one forward pass each (mean batch {e['troupe_mean_batch']}, largest {e['troupe_largest_batch']}) | {e['troupe_req_per_s']} | {e['troupe_p50_ms']} | |
| bare Ray Serve, same topology (FastAPI ingress -> handle -> model deployment), one forward pass per request | {e['bare_req_per_s']} | {e['bare_p50_ms']} | **{e['speedup']}x** |
| bare Ray Serve, one deployment holding the model (proxy -> replica), one forward pass per request | {e['bare1_req_per_s']} | {e['bare1_p50_ms']} | **{e['speedup_vs_single']}x** |

Same load sent by the driver straight to each model deployment's handle, one call per
request (no HTTP proxy, no ingress, no gateway merging: Serve's `@serve.batch` in the
Troupe replica merges them), same run:

| side | req/s (median of {args.rounds}) |
|---|---|
| Troupe's embeddings deployment (largest batch seen: {h['troupe_largest_batch']}) | {h['troupe_req_per_s']} |
| bare deployment, one forward pass per request | {h['bare_req_per_s']} |
| **Troupe / bare** | **{h['speedup']}x** |

In-process reference: one batch of 32 sentences in {b['batch_ms_best_of_5']} ms = {b['sentences_per_s']} sentences/s (best of 5).

## Speech (in process, 1 thread)

| model | audio | compute | real-time factor |
|---|---|---|---|
| Piper en_US-joe-medium (TTS) | {s['audio_seconds']} s | {s['tts_seconds_best']} s (first audio after {s['tts_first_audio_s']} s) | {s['tts_rtf']} |
| Whisper tiny.en int8 (ASR) | {s['audio_seconds']} s | {s['asr_seconds_best']} s | {s['asr_rtf']} |

ASR read back: "{s['asr_text']}"
"""
    (RESULTS / f"{stamp}-modalities.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

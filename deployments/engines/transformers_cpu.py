"""CPU text engine: a Hugging Face causal LM (by default the bundled SmolLM2-135M-Instruct).

Weights come from local files only; nothing ever talks to a model hub.

* **Weights.** Local files only: the bundled GGUF converted once to safetensors, or a
  folder or ``.gguf`` named by ``config.model_path`` (:mod:`deployments.engines.gguf_cache`).
* **Generation.** One worker thread per replica runs ``model.generate`` (requests queue
  behind it and count as active). A token-id streamer decodes each new token, trims stop
  strings and hands deltas to the event loop with ``call_soon_threadsafe``; a consumer that
  lags receives what piled up as one merged delta. A stopping criterion checks a
  ``threading.Event``, so closing the stream or ``abort()`` stops generation after the
  token being computed, and ``active_requests()`` drops once the worker has really stopped
  (the final output of a request is yielded only after that, too).
"""

from __future__ import annotations

import os

# Offline by design: set before transformers / huggingface_hub read their constants.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Optional

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from deployments.engines.base import plan_output_tokens
from deployments.engines.gguf_cache import resolve_model_dir
from deployments.engines.lora_peft import PeftAdapters
from deployments.engines.stop_strings import StopStringTracker
from serve_app.errors import InvalidRequest, ModelNotLoaded
from serve_app.protocol.internal import EngineOutput, GenerationRequest, SamplingParams
from serve_app.settings import TransformersEngineConfig

__all__ = ["TransformersTextEngine", "plan_max_new_tokens"]

logger = logging.getLogger("troupe.engine.transformers")

#: vLLM's cut-off: a temperature below this is greedy decoding.
_GREEDY_EPS = 1e-5

# The shared rule (explicit max_tokens must fit; otherwise the default, capped by the room).
plan_max_new_tokens = plan_output_tokens


# --------------------------------------------------------------------------- the engine


_Item = tuple[str, int, Optional[str], Optional[BaseException]]  # text, tokens, finish, error


@dataclass(eq=False)
class _Job:
    """One request's state, shared by the event loop and the worker thread."""

    key: int
    request_id: str
    input_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    queue: "asyncio.Queue[_Item]"
    tracker: StopStringTracker
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Optional[concurrent.futures.Future] = None
    ids: list[int] = field(default_factory=list)
    pending_tokens: int = 0  # counted but not yet sent
    produced: int = 0  # tokens the model computed for this job (incl. any discarded)
    finished: bool = False  # the final item was pushed
    started: bool = False  # the worker picked it up
    adapter: Optional[str] = None  # LoRA adapter id (issue 19); None: the base model

    def push(self, item: _Item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is gone: nobody is listening
            self.cancel.set()

    def finish(self, text: str, finish: str) -> None:
        if self.finished:
            return
        self.finished = True
        self.push((text, self.pending_tokens, finish, None))
        self.pending_tokens = 0


class _TokenStreamer(BaseStreamer):
    """Receives token ids from ``generate`` (the prompt first) and forwards them to the engine."""

    def __init__(self, on_token: Callable[[int], None]) -> None:
        self._on_token = on_token
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() hands over the prompt ids first
            self._prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self._on_token(int(token))

    def end(self) -> None:
        pass


class _StopWhen(StoppingCriteria):
    """Ends generation once the job is finished (stop string, ...) or cancelled."""

    def __init__(self, job: _Job) -> None:
        self._job = job

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        done = self._job.finished or self._job.cancel.is_set()
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


class TransformersTextEngine:
    """See the module docstring. Implements :class:`deployments.engines.base.TextEngine`."""

    def __init__(self, model_id: str, config: TransformersEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.context_length: int = config.context_length or 0
        self.model_dir: Optional[Path] = None
        #: Tokens the model computed in this replica (including ones dropped after a stop
        #: or an abort); a cheap work counter for metrics and tests.
        self.tokens_generated_total = 0
        self.load_seconds: Optional[float] = None
        self._tokenizer: Any = None
        self._model: Any = None
        self._eos_ids: frozenset[int] = frozenset()
        self._pad_id: Optional[int] = None
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._jobs: dict[int, _Job] = {}
        self._jobs_lock = threading.Lock()
        self._keys = itertools.count()
        self._closed = False
        self._lora: Optional[PeftAdapters] = None  # LoRA adapters (issue 19), made on first load

    # ---------------------------------------------------------------- adapters (issue 19)

    async def _on_worker(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the generation thread: model changes never race a running step."""
        if self._executor is None:
            raise ModelNotLoaded(f"Model {self.model_id!r} is not loaded on this replica.")
        return await asyncio.wrap_future(self._executor.submit(fn))

    async def load_adapter(self, adapter_id: str, path: str) -> None:
        """Load a PEFT LoRA adapter (see :mod:`deployments.engines.lora_peft`)."""
        if self._lora is None:
            self._lora = PeftAdapters(self._model)
        await self._on_worker(lambda: self._lora.load(adapter_id, path))  # type: ignore[union-attr]

    async def unload_adapter(self, adapter_id: str) -> None:
        if self._lora is not None:
            await self._on_worker(lambda: self._lora.unload(adapter_id))  # type: ignore[union-attr]

    # ---------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        if self._model is not None:
            return
        started = time.monotonic()
        await asyncio.to_thread(self._load)
        self.load_seconds = time.monotonic() - started
        logger.info(
            "model %s loaded from %s in %.2f s (context %d, %d threads)",
            self.model_id, self.model_dir, self.load_seconds, self.context_length,
            self.config.num_threads,
        )

    def _load(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(self.config.num_threads)
        folder = resolve_model_dir(self.config)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bars in replica logs
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=torch.float32, local_files_only=True
            )
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        model.eval()
        self._attach(tokenizer, model, folder)

    def _attach(self, tokenizer: Any, model: Any, folder: Optional[Path] = None) -> None:
        """Adopt a loaded tokenizer and model and start the worker (tests pass fakes)."""
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = tokenizer.eos_token_id
        eos_ids = frozenset(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        pad = model.generation_config.pad_token_id
        if pad is None:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos_ids, default=None)
        self.model_dir = folder
        self._tokenizer, self._model = tokenizer, model
        self._eos_ids, self._pad_id = eos_ids, pad
        if not self.config.context_length:
            self.context_length = int(model.config.max_position_embeddings)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix=f"troupe-gen-{self.model_id}",
            initializer=torch.set_num_threads,
            initargs=(self.config.num_threads,),
        )

    async def shutdown(self) -> None:
        self._closed = True
        with self._jobs_lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
            if job.future is not None:
                job.future.cancel()
        if self._executor is not None:
            executor, self._executor = self._executor, None
            await asyncio.to_thread(executor.shutdown, wait=True, cancel_futures=True)
        self._model = self._tokenizer = None  # let the weights go

    def active_requests(self) -> int:
        with self._jobs_lock:
            return len(self._jobs)

    async def abort(self, request_id: str) -> None:
        with self._jobs_lock:
            jobs = [j for j in self._jobs.values() if j.request_id == request_id]
        for job in jobs:
            job.cancel.set()
            if job.future is not None:
                job.future.cancel()  # still queued: it never runs (its done callback reports abort)

    # ---------------------------------------------------------------- requests

    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids: the chat template for messages, plain tokenization for a prompt."""
        tok = self._tokenizer
        if request.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in request.messages]
            try:
                enc = tok.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=True, return_dict=True
                )
            except Exception as exc:  # jinja raises for roles/orders the template rejects
                raise InvalidRequest(
                    f"The chat template of model {self.model_id!r} rejected these messages: {exc}",
                    param="messages",
                ) from None
            ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
        else:
            ids = tok(request.prompt or "", add_special_tokens=True)["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        ids = [int(i) for i in ids]
        if not ids:  # an empty raw prompt: start from BOS (or EOS) like other engines do
            start = tok.bos_token_id if tok.bos_token_id is not None else min(self._eos_ids)
            ids = [int(start)]
        return ids

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineOutput]:
        if self._model is None or self._closed or self._executor is None:
            raise ModelNotLoaded(
                f"Model {self.model_id!r} is not loaded on this replica (starting or stopping)."
            )
        input_ids = self.encode(request)
        prompt_tokens = len(input_ids)
        max_new = plan_max_new_tokens(
            self.context_length,
            prompt_tokens,
            request.sampling.max_tokens,
            "messages" if request.messages is not None else "prompt",
            getattr(request.sampling, "default_max_tokens", None),
        )
        if max_new == 0:
            yield EngineOutput("", 0, prompt_tokens, "length")
            return
        loop = asyncio.get_running_loop()
        job = _Job(
            key=next(self._keys),
            request_id=request.request_id,
            input_ids=input_ids,
            max_new_tokens=max_new,
            sampling=request.sampling,
            loop=loop,
            queue=asyncio.Queue(),
            tracker=StopStringTracker(request.sampling.stop),
            adapter=request.adapter,
        )
        with self._jobs_lock:
            self._jobs[job.key] = job  # queued requests count as active
        try:
            job.future = self._executor.submit(self._run, job)
        except RuntimeError:  # executor shut down meanwhile
            self._drop(job)
            raise ModelNotLoaded(f"Model {self.model_id!r} is shutting down on this replica.") from None
        job.future.add_done_callback(lambda fut, job=job: self._on_done(job, fut))
        try:
            while True:
                text, count, finish, error = await job.queue.get()
                parts = [text]
                # The consumer lagged: merge everything that piled up into one delta.
                while finish is None and error is None and not job.queue.empty():
                    more_text, more_count, finish, error = job.queue.get_nowait()
                    parts.append(more_text)
                    count += more_count
                if (finish is not None or error is not None) and not job.future.done():
                    # The worker is wrapping up (a stop string costs it one more step):
                    # wait, so a client holding the final output sees the slot free.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(asyncio.wrap_future(job.future))
                if error is not None:
                    raise error
                matched = job.tracker.matched if finish == "stop" else None
                yield EngineOutput("".join(parts), count, prompt_tokens, finish, matched)  # type: ignore[arg-type]
                if finish is not None:
                    return
        finally:
            job.cancel.set()  # no-op once finished; otherwise stops the worker at the next token
            future = job.future
            if not future.cancel() and not future.done():
                # Wait (briefly: about one token) until the worker has really stopped, so
                # the slot is free when aclose() returns.
                try:
                    await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), 30)
                except asyncio.TimeoutError:
                    logger.warning("request %s: worker still busy 30 s after abort", job.request_id)
                except asyncio.CancelledError:
                    raise
                except Exception:  # already reported through the queue
                    pass

    # ---------------------------------------------------------------- worker side

    def _drop(self, job: _Job) -> None:
        with self._jobs_lock:
            self._jobs.pop(job.key, None)

    def _on_done(self, job: _Job, future: concurrent.futures.Future) -> None:
        """Runs when the job's future settles: after the worker returned, or on cancel()."""
        self._drop(job)
        if not job.finished:  # cancelled while queued, or the worker died unexpectedly
            if not future.cancelled() and future.exception() is not None:
                job.finished = True
                job.push(("", job.pending_tokens, None, future.exception()))
            else:
                job.finish("", "abort")

    def _run(self, job: _Job) -> None:
        job.started = True
        if job.cancel.is_set():
            job.finish("", "abort")
            return
        sp = job.sampling
        sample = sp.temperature is not None and sp.temperature > _GREEDY_EPS
        try:
            from transformers import GenerationConfig

            gen_config = GenerationConfig(
                max_new_tokens=job.max_new_tokens,
                min_new_tokens=0,
                do_sample=sample,
                temperature=float(sp.temperature) if sample else 1.0,
                top_p=min(max(float(sp.top_p), 1e-6), 1.0) if sample else 1.0,
                top_k=0 if sample else None,  # OpenAI semantics: no top-k cut when sampling
                repetition_penalty=1.0,
                num_beams=1,
                eos_token_id=sorted(self._eos_ids) or None,
                pad_token_id=self._pad_id,
            )
            ids = torch.tensor([job.input_ids], dtype=torch.long)
            with torch.random.fork_rng(devices=[]), torch.inference_mode():
                if sample:  # the global CPU generator is what generate() samples from
                    torch.manual_seed(sp.seed if sp.seed is not None else secrets.randbits(63))
                model, lora_kwargs = (  # the job's adapter, per sequence (issue 19)
                    self._lora.generate_target([job.adapter]) if self._lora is not None
                    else (self._model, {})
                )
                model.generate(
                    **lora_kwargs,
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    generation_config=gen_config,
                    streamer=_TokenStreamer(lambda token: self._on_token(job, token)),
                    stopping_criteria=StoppingCriteriaList([_StopWhen(job)]),
                )
        except BaseException as exc:  # report it to the consumer, then let it settle
            if not job.finished:
                job.finished = True
                job.push(("", job.pending_tokens, None, exc))
            if not isinstance(exc, Exception):
                raise
            return
        if not job.finished:  # ended without EOS, stop string or max_tokens: cancelled
            text = "" if job.cancel.is_set() else job.tracker.flush(self._decode(job.ids))
            job.finish(text, "abort" if job.cancel.is_set() else "length")

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def _on_token(self, job: _Job, token: int) -> None:
        """One new token from the worker thread: count it, decode, stream or finish."""
        job.produced += 1
        self.tokens_generated_total += 1
        if job.finished:  # one extra step after a stop string or abort: drop it
            return
        job.ids.append(token)
        job.pending_tokens += 1
        if token in self._eos_ids:
            job.finish(job.tracker.flush(self._decode(job.ids[:-1])), "stop")
            return
        full = self._decode(job.ids)
        delta, hit = job.tracker.update(full)
        if hit:
            job.finish(delta, "stop")
        elif len(job.ids) >= job.max_new_tokens:
            job.finish(delta + job.tracker.flush(full), "length")
        elif delta:
            job.push((delta, job.pending_tokens, None, None))
            job.pending_tokens = 0

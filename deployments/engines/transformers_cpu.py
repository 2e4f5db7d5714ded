"""CPU text engine: a Hugging Face causal LM (by default the bundled SmolLM2-135M-Instruct).

Weights come from local files only; nothing ever talks to a model hub.

* **Weights.** Local files only: the bundled GGUF converted once to safetensors, or a
  folder or ``.gguf`` named by ``config.model_path`` (:mod:`deployments.engines.gguf_cache`),
  held as int8, bfloat16 or float32 (``config.weights``, :mod:`deployments.engines.weights`).
* **Generation.** Continuous batching (:mod:`deployments.engines.batch_loop`): one loop
  thread per replica steps up to ``max_num_seqs`` requests a token at a time; requests
  join and leave at token boundaries, each with its own sampling, stop strings and
  processors. The waiting room is fair across API keys, serves interactive traffic
  first and is bounded by expected wait (:mod:`deployments.engines.fair_queue`). Each
  new token is decoded, stop strings trimmed, and deltas handed to the event loop with
  ``call_soon_threadsafe``; a consumer that lags receives what piled up as one merged
  delta. Closing the stream or ``abort()`` removes the request at the next token
  boundary, and ``active_requests()`` drops once its slot is free (the final output of
  a request is yielded only after that, too).
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
import functools
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Optional

from deployments.engines.base import plan_output_tokens
from deployments.engines.batch_loop import BatchLoop, Sampler, Seq, admission_check
from deployments.engines.chat_render import encode_prompt
from deployments.engines.gguf_cache import resolve_model_dir
from deployments.engines.logits import prompt_token_logprobs
from deployments.engines.lora_peft import PeftAdapterMethods, PeftAdapters
from deployments.engines.prefix_cache import PrefixCache
from deployments.engines.sequence_output import SequenceOutput
from deployments.engines.stop_strings import StopStringTracker
from serve_app.errors import InvalidRequest, ModelNotLoaded, Overloaded
from serve_app.protocol.internal import EngineFinishReason, EngineOutput, GenerationRequest, SamplingParams
from serve_app.settings import TransformersEngineConfig

__all__ = ["TransformersTextEngine", "plan_max_new_tokens"]

logger = logging.getLogger("troupe.engine.transformers")

# The shared rule (explicit max_tokens must fit; otherwise the default, capped by the room).
plan_max_new_tokens = plan_output_tokens


# --------------------------------------------------------------------------- the engine


_Item = tuple[str, int, Optional[EngineFinishReason], Optional[BaseException]]  # text, tokens, finish, error


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
    #: Processors, logprobs and tool-call parsing of this sequence (agent features).
    out: SequenceOutput
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Optional[concurrent.futures.Future] = None
    ids: list[int] = field(default_factory=list)
    pending_tokens: int = 0  # counted but not yet sent
    produced: int = 0  # tokens the model computed for this job (incl. any discarded)
    finished: bool = False  # the final item was pushed
    priority: Optional[str] = None
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache
    adapter: Optional[str] = None  # LoRA adapter id (issue 19); None: the base model

    def push(self, item: _Item) -> None:
        text, tokens, finish, error = item
        if error is None:  # tool calls out of the text, logprobs beside it
            item = (self.out.shape(text, final=finish is not None), tokens, finish, error)  # type: ignore[assignment]  # the consumer reads shaped text
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is gone: nobody is listening
            self.cancel.set()

    def finish(self, text: str, finish: EngineFinishReason) -> None:
        if self.finished:
            return
        self.finished = True
        self.push((text, self.pending_tokens, finish, None))
        self.pending_tokens = 0


class TransformersTextEngine(PeftAdapterMethods):
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
        self._loop: Optional[BatchLoop] = None
        self._jobs: dict[int, _Job] = {}
        self._jobs_lock = threading.Lock()
        self._keys = itertools.count()
        self._closed = False
        self._lora: Optional[PeftAdapters] = None  # LoRA adapters (issue 19), made on first load

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
        import torch
        from transformers import AutoTokenizer
        from transformers.utils import logging as hf_logging

        from deployments.engines.weights import load_causal_lm

        torch.set_num_threads(self.config.num_threads)
        folder = resolve_model_dir(self.config)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no "Loading weights" bars in replica logs
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            model = load_causal_lm(folder, self.config.weights)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self._attach(tokenizer, model, folder)

    def _attach(self, tokenizer: Any, model: Any, folder: Optional[Path] = None) -> None:
        """Adopt a loaded tokenizer and model and start the batch loop.

        ``model`` is a transformers causal LM, or anything with the loop's ``Stepper``
        methods (tests pass fakes).
        """
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
        if hasattr(model, "step") and hasattr(model, "new_kv"):
            stepper = model
        else:
            from deployments.engines.ragged import RaggedModel

            stepper = RaggedModel(model)
        cfg = self.config
        self._loop = BatchLoop(
            stepper,
            max_num_seqs=cfg.max_num_seqs,
            max_batch_tokens=cfg.max_batch_tokens,
            max_queue_wait_s=cfg.max_queue_wait_s,
            num_threads=cfg.num_threads,
            on_token=self._on_token,
            on_leave=self._on_leave,
            on_expire=self._on_expire,
            prefix_cache=PrefixCache(cfg.prefix_cache_tokens) if cfg.prefix_cache_tokens else None,
            name=f"troupe-gen-{self.model_id}",
        )

    async def shutdown(self) -> None:
        self._closed = True
        with self._jobs_lock:
            jobs = list(self._jobs.values())
        for job in jobs:
            job.cancel.set()
            if job.future is not None:
                job.future.cancel()
        if self._loop is not None:
            loop, self._loop = self._loop, None
            await asyncio.to_thread(loop.close)
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
        if jobs and self._loop is not None:
            self._loop.wake()

    def queue_stats(self) -> dict[str, Any]:
        """Queue gauges of this replica (depth, running, expected wait) for /health."""
        if self._loop is None:
            return {"queue_depth": 0, "running": 0, "expected_wait_s": 0.0}
        return self._loop.stats()

    # ---------------------------------------------------------------- requests

    def encode(self, request: GenerationRequest) -> list[int]:
        """Prompt token ids: the chat template for messages, plain tokenization for a prompt."""
        return encode_prompt(self._tokenizer, request, self.model_id, self._eos_ids)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineOutput]:
        if self._model is None or self._closed or self._loop is None:
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
        prompt_lp = await _prompt_logprobs(self._model, self._tokenizer, request, input_ids)
        if request.sampling.echo:  # set by the gateway for token-id prompts: only we can detokenize
            yield EngineOutput(self._tokenizer.decode(input_ids), 0, prompt_tokens, prompt_logprobs=prompt_lp)
            prompt_lp = None
        if max_new == 0:
            yield EngineOutput("", 0, prompt_tokens, "length", prompt_logprobs=prompt_lp)
            return
        job = self._enqueue(request, input_ids, max_new)
        future = job.future
        assert future is not None  # _enqueue sets it
        try:
            while True:
                shaped, count, finish, error = await job.queue.get()
                parts = [shaped]
                # The consumer lagged: merge everything that piled up into one delta.
                while finish is None and error is None and not job.queue.empty():
                    more, more_count, finish, error = job.queue.get_nowait()
                    parts.append(more)
                    count += more_count
                if (finish is not None or error is not None) and not future.done():
                    # The worker is wrapping up (a stop string costs it one more step):
                    # wait, so a client holding the final output sees the slot free.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(asyncio.wrap_future(future))
                if error is not None:
                    raise error
                matched = job.tracker.matched if finish == "stop" else None
                if finish is not None:
                    finish = job.out.finish_reason(finish)  # tool_calls after calls
                yield _output(parts, count, prompt_tokens, finish, matched, job.cached_tokens, prompt_lp)
                prompt_lp = None  # on the first output only
                if finish is not None:
                    return
        finally:
            job.cancel.set()  # no-op once finished; otherwise stops the worker at the next token
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

    def _enqueue(self, request: GenerationRequest, input_ids: list[int], max_new: int) -> _Job:
        """Admit a request (or raise Overloaded) and put it in the loop's waiting room."""
        priority = getattr(request, "priority", None)
        assert self._loop is not None
        # Time spent in Serve's queue counts against max_queue_wait_s (same host clock).
        waited = max(0.0, time.time() - request.dispatched_at) if request.dispatched_at else 0.0
        admission_check(self._loop, self.config, self.model_id, priority, waited)
        job = _Job(
            key=next(self._keys),
            request_id=request.request_id,
            input_ids=input_ids,
            max_new_tokens=max_new,
            sampling=request.sampling,
            loop=asyncio.get_running_loop(),
            queue=asyncio.Queue(),
            tracker=StopStringTracker(request.sampling.stop),
            out=SequenceOutput(request, self._tokenizer, self.config.tool_call_parser),
            priority=priority,
            adapter=request.adapter,
        )
        job.future = concurrent.futures.Future()
        job.future.add_done_callback(functools.partial(self._on_done, job))
        sp = request.sampling
        seq = Seq(job, Sampler(sp.temperature, sp.top_p, sp.seed), job.out.processors)
        with self._jobs_lock:
            self._jobs[job.key] = job  # queued requests count as active
        assert self._loop is not None
        # Requests arriving in one event-loop turn (a burst) join one step together.
        self._loop.submit(seq, getattr(request, "api_key_id", None), priority, waited, batch_with=job.loop)
        return job

    # ---------------------------------------------------------------- loop side

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

    def _on_leave(self, seq: Seq, error: Optional[BaseException]) -> None:
        """The loop let a sequence go (finished, cancelled or failed): report, free the slot."""
        job = seq.job
        if not job.finished:
            job.finished = True
            if error is not None:
                job.push(("", job.pending_tokens, None, error))
            else:  # left without EOS, stop string or max_tokens: cancelled
                job.push(("", job.pending_tokens, "abort", None))
        if job.future is not None and not job.future.done():
            job.future.set_result(None)

    def _on_expire(self, seq: Seq, wait_s: float) -> None:
        """A request waited longer than ``max_queue_wait_s``: it ends with 429 OVERLOADED."""
        job = seq.job
        job.finished = True
        if job.future is not None:  # settle it first: the consumer must not wait on it
            job.future.cancel()
        bound = self.config.max_queue_wait_s or 0.0
        job.push(("", 0, None, Overloaded(
            f"Model {self.model_id!r} is busy: this request waited {bound:g} s "
            "(max_queue_wait_s) without starting; retry later.",
            retry_after_s=max(wait_s, 1.0),
        )))

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
        grammar_done = job.out.on_token(token, token in self._eos_ids)
        if token in self._eos_ids:
            job.finish(job.tracker.flush(self._decode(job.ids[:-1])), "stop")
            return
        full = self._decode(job.ids)
        delta, hit = job.tracker.update(full)
        if grammar_done and not hit:  # a whole match: nothing more may follow
            job.finish(delta + job.tracker.flush(full), "stop")
        elif hit:
            job.finish(delta, "stop")
        elif len(job.ids) >= job.max_new_tokens:
            job.finish(delta + job.tracker.flush(full), "length")
        elif delta:
            job.push((delta, job.pending_tokens, None, None))
            job.pending_tokens = 0


async def _prompt_logprobs(
    model: Any, tokenizer: Any, request: GenerationRequest, input_ids: list[int]
) -> Optional[list]:
    """The prompt tokens' logprobs when asked for (one extra forward over the prompt, off
    the event loop; the batch loop keeps running meanwhile)."""
    top_k = request.sampling.prompt_logprobs
    if top_k is None or not input_ids:
        return None
    if request.adapter is not None:
        raise InvalidRequest("echo with logprobs is not supported with a LoRA adapter "
                             "(the prompt's logprobs come from the base model); omit one.",
                             param="echo")
    return await asyncio.to_thread(prompt_token_logprobs, model, input_ids, top_k, tokenizer)


def _output(parts: list, count: int, prompt_tokens: int, finish: Any, matched: Optional[str],
            cached_tokens: int, prompt_logprobs: Optional[list] = None) -> EngineOutput:
    """One EngineOutput from shaped deltas (text, logprobs, tool-call fragments) merged in order."""
    logprobs = [lp for _, lps, _ in parts for lp in lps or ()]
    calls = [d for _, _, ds in parts for d in ds or ()]
    return EngineOutput(
        "".join(text for text, _, _ in parts), count, prompt_tokens, finish, matched,
        logprobs=logprobs if any(lps is not None for _, lps, _ in parts) else None,
        tool_calls=calls or None, cached_tokens=cached_tokens, prompt_logprobs=prompt_logprobs,
    )

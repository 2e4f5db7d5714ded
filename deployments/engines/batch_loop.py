"""Continuous batching: one thread steps every running sequence a token at a time.

Each step (a token boundary) the loop expires waiting requests past their queue bound,
lets cancelled or finished sequences leave (freeing their slot at once), admits waiting
ones while slots and the step's token budget allow, then runs one model pass holding the
prompts of the newcomers (their first token comes in this step) and one token of every
sequence already decoding. Every sequence
keeps its own sampler (seeded generator, temperature, top-p) and its own logits
processors, called with transformers' ``LogitsProcessor`` signature on its own row.

transformers' ``ContinuousBatchingManager`` was measured first and not used: one
``do_sample`` for the whole manager, no per-request seed, and only tensor-batched
processors, so mixed greedy/sampled streams and per-sequence stateful processors (the
engine contract) cannot be expressed; see bench/README.md.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from deployments.engines.fair_queue import FairQueue, ServiceTime, now, stats
from deployments.engines.prefix_cache import PrefixCache
from serve_app.errors import Overloaded

__all__ = ["Stepper", "Sampler", "Seq", "BatchLoop", "admission_check"]

logger = logging.getLogger("troupe.engine.batch")

#: vLLM's cut-off: a temperature below this is greedy decoding.
GREEDY_EPS = 1e-5


class Stepper(Protocol):
    """What the loop needs from a model (``ragged.RaggedModel``; tests pass a fake)."""

    def new_kv(self) -> Any: ...

    def step(self, kvs: Sequence[Any], chunks: Sequence[Sequence[int]],
             adapters: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
        """New tokens of each sequence in one pass; next-token logits per sequence.
        ``adapters``: each sequence's LoRA adapter, passed only when one has any."""
        ...


class Sampler:
    """One sequence's token choice: greedy, or temperature + top-p from its own generator."""

    def __init__(self, temperature: Optional[float], top_p: float, seed: Optional[int]) -> None:
        self.greedy = temperature is None or temperature <= GREEDY_EPS
        self.warpers: list[Any] = []
        self.generator: Optional[torch.Generator] = None
        if not self.greedy:
            from transformers import TemperatureLogitsWarper, TopPLogitsWarper

            self.warpers.append(TemperatureLogitsWarper(float(temperature)))  # type: ignore[arg-type]
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(min(max(float(top_p), 1e-6), 1.0)))
            self.generator = torch.Generator().manual_seed(
                seed if seed is not None else secrets.randbits(63)
            )

    def choose(self, ids: Optional[torch.Tensor], row: torch.Tensor) -> int:
        """The next token from a processed ``[1, vocab]`` row."""
        if self.greedy:
            return int(row.argmax(dim=-1))
        for warper in self.warpers:
            row = warper(ids, row)
        probs = torch.softmax(row, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


@dataclass(eq=False)
class Seq:
    """A request in the loop. ``job`` is the engine's record (``input_ids``, ``cancel``,
    ``finished``, ``future``); the loop never interprets tokens itself."""

    job: Any
    sampler: Sampler
    processors: list[Any] = field(default_factory=list)
    #: Optional ``hook(processed_row, token)`` after each choice (logprobs).
    scores_hook: Optional[Callable[[torch.Tensor, int], None]] = None
    kv: Any = None
    ids: list[int] = field(default_factory=list)
    cached: int = 0  # prompt tokens taken from the prefix cache
    enqueued_at: float = 0.0
    admitted_at: float = 0.0

    def done(self) -> bool:
        return bool(self.job.finished or self.job.cancel.is_set())


class BatchLoop:
    """The step loop and its waiting room. Callbacks run on the loop thread."""

    def __init__(
        self,
        stepper: Stepper,
        *,
        max_num_seqs: int,
        max_batch_tokens: int,
        max_queue_wait_s: Optional[float],
        num_threads: int,
        on_token: Callable[[Any, int], None],
        on_leave: Callable[[Seq, Optional[BaseException]], None],
        on_expire: Callable[[Seq, float], None],
        prefix_cache: Optional[PrefixCache] = None,
        name: str = "troupe-batch",
    ) -> None:
        self.stepper = stepper
        self.max_num_seqs, self.max_batch_tokens = max_num_seqs, max_batch_tokens
        self.max_queue_wait_s = max_queue_wait_s
        self.num_threads = num_threads
        self._on_token, self._on_leave, self._on_expire = on_token, on_leave, on_expire
        self.waiting: FairQueue[Seq] = FairQueue()
        self.running: list[Seq] = []
        self.service = ServiceTime()
        self.prefix_cache = prefix_cache
        self.steps = 0
        self._cond = threading.Condition()
        self._closed = False
        #: Event loops that have a wake of this loop scheduled (see :meth:`submit`).
        self._wake_pending: set[asyncio.AbstractEventLoop] = set()
        #: Work for the loop's thread between two steps (LoRA adapter loads and unloads).
        self._calls: list[tuple[Callable[[], Any], concurrent.futures.Future]] = []
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- outside the thread

    def submit(self, seq: Seq, key: Any, priority: Optional[str], waited_s: float = 0.0,
               batch_with: Optional[asyncio.AbstractEventLoop] = None) -> None:
        """Queue a sequence that has already waited ``waited_s`` on its way here (in
        Serve's queue): its queue-wait bound counts that too.

        ``batch_with``: the submitting event loop. The loop thread is then woken from it
        once its current turn is over, so requests arriving in one turn (a burst) join the
        same step; woken at the first, it would start a step with that one alone and make
        the rest wait a whole step for their prefill.
        """
        seq.enqueued_at = now() - waited_s
        self.waiting.push(seq, key, priority)
        if batch_with is None:
            self.wake()
        elif batch_with not in self._wake_pending:
            self._wake_pending.add(batch_with)
            batch_with.call_soon(self._wake_from, batch_with)

    def _wake_from(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self._wake_pending.discard(event_loop)
        self.wake()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def run_between_steps(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the loop's thread before its next step, so a change to the model
        (a LoRA adapter load or unload) never races a forward; the future gets its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            if self._closed:
                future.set_exception(RuntimeError("the batch loop is closed"))
                return future
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def expected_wait(self, priority: Optional[str]) -> float:
        ahead = self.waiting.depth(FairQueue.rank(priority))
        return self.service.expected_wait(ahead, len(self.running), self.max_num_seqs)

    def stats(self) -> dict[str, Any]:
        return stats(self.waiting, self.service, len(self.running), self.max_num_seqs)

    def close(self) -> None:
        """Stop after the current step; every waiting and running sequence ends as aborted."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ---------------------------------------------------------------- the thread

    def _main(self) -> None:
        torch.set_num_threads(self.num_threads)
        while True:
            with self._cond:
                while (not self._closed and not self.running and not len(self.waiting)
                       and not self._calls):
                    self._cond.wait()
                if self._closed:
                    break
                calls, self._calls = self._calls, []
            _run_calls(calls)
            if self.running or len(self.waiting):
                self._step()  # waiting requests expire here: the loop only idles when none wait
        self._drain()

    def _drain(self) -> None:
        for seq in list(self.running):
            seq.job.cancel.set()
            self._leave(seq, None)
        while (queued := self.waiting.pop()) is not None:
            queued.job.future.cancel()
        with self._cond:
            calls, self._calls = self._calls, []
        for _, future in calls:
            future.set_exception(RuntimeError("the batch loop is closed"))

    def _step(self) -> None:
        self.steps += 1
        self._expire()
        for seq in [s for s in self.running if s.done()]:
            self._leave(seq, None)
        decoding = list(self.running)
        joining = self._admit(len(decoding))
        if decoding or joining:
            chunks = [s.ids[s.cached:] for s in joining] + [s.ids[-1:] for s in decoding]
            self._forward(joining + decoding, chunks)

    def _expire(self) -> None:
        if self.max_queue_wait_s is None or not len(self.waiting):
            return
        t = now()
        for seq in self.waiting:
            if t - seq.enqueued_at > self.max_queue_wait_s and self.waiting.remove(seq):
                self._on_expire(seq, self.expected_wait(getattr(seq.job, "priority", None)))

    def _admit(self, decode_tokens: int) -> list[Seq]:
        """Waiting sequences that join in this step (slots and token budget allowing)."""
        used, joining = decode_tokens, list[Seq]()
        while len(self.running) < self.max_num_seqs:
            seq = self.waiting.peek()
            if seq is None:
                break
            cost = len(seq.job.input_ids)
            if (joining or decode_tokens) and used + cost > self.max_batch_tokens:
                break  # over this step's budget: a later step (alone, a prompt always fits)
            self.waiting.pop()  # the peeked one (only this thread pops): its key rotates
            if not seq.job.future.set_running_or_notify_cancel():
                continue  # cancelled while waiting: its done callback reported it
            seq.admitted_at = now()
            seq.ids = list(seq.job.input_ids)
            if self.prefix_cache is not None and _adapter(seq) is None:
                seq.cached, seq.kv = self.prefix_cache.lookup(seq.ids)
                seq.job.cached_tokens = seq.cached
            if seq.kv is None:
                seq.kv = self.stepper.new_kv()
            self.running.append(seq)
            joining.append(seq)
            used += cost
        return joining

    def _forward(self, seqs: list[Seq], chunks: list[list[int]]) -> None:
        adapters = [_adapter(s) for s in seqs]
        try:
            if any(a is not None for a in adapters):  # LoRA sequences (issue 19) in this step
                logits = self.stepper.step([s.kv for s in seqs], chunks, adapters)
            else:
                logits = self.stepper.step([s.kv for s in seqs], chunks)
        except Exception as exc:
            for seq in seqs:
                self._leave(seq, exc)
            return
        for seq, row in zip(seqs, logits):
            try:
                self._emit(seq, row)
            except Exception as exc:
                self._leave(seq, exc)

    def _emit(self, seq: Seq, logits: torch.Tensor) -> None:
        row = logits.reshape(1, -1)
        ids = None
        if seq.processors or not seq.sampler.greedy:
            ids = torch.tensor([seq.ids], dtype=torch.long)
        for proc in seq.processors:
            row = proc(ids, row)
        token = seq.sampler.choose(ids, row)
        if seq.scores_hook is not None:
            seq.scores_hook(row, token)
        seq.ids.append(token)
        self._on_token(seq.job, token)
        if seq.done():
            self._leave(seq, None)

    def _leave(self, seq: Seq, error: Optional[BaseException]) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.service.observe(now() - seq.admitted_at)
            if (self.prefix_cache is not None and error is None and not seq.job.cancel.is_set()
                    and _adapter(seq) is None):  # an adapter's keys/values are its own
                self.prefix_cache.store(seq.ids, seq.kv)
        seq.kv = None
        self._on_leave(seq, error)


def _adapter(seq: Seq) -> Optional[str]:
    """The sequence's LoRA adapter (None: the base model)."""
    return getattr(seq.job, "adapter", None)


def _run_calls(calls: list[tuple[Callable[[], Any], concurrent.futures.Future]]) -> None:
    for fn, future in calls:
        if not future.set_running_or_notify_cancel():
            continue
        try:
            future.set_result(fn())
        except BaseException as exc:  # the caller's future re-raises it
            future.set_exception(exc)


def admission_check(loop: BatchLoop, config: Any, model_id: str, priority: Optional[str],
                    waited_s: float = 0.0) -> None:
    """Refuse a request whose queue wait would pass the bounds: 429 OVERLOADED, Retry-After.

    ``config`` carries ``max_waiting`` (a count) and ``max_queue_wait_s`` (seconds);
    ``waited_s``: how long the request already waited before it reached this replica.
    """
    busy = len(loop.running) + len(loop.waiting) >= loop.max_num_seqs
    if busy and len(loop.waiting) >= config.max_waiting:
        wait = max(loop.expected_wait(priority), 1.0)
        raise Overloaded(
            f"Model {model_id!r} has {len(loop.waiting)} requests waiting on this replica "
            f"(the most it queues); retry in about {wait:.0f} s.",
            retry_after_s=wait,
        )
    wait = loop.expected_wait(priority)
    if config.max_queue_wait_s is not None and waited_s + wait > config.max_queue_wait_s:
        raise Overloaded(
            f"Model {model_id!r} is busy: a new request would wait about "
            f"{waited_s + wait:.0f} s in all (more than max_queue_wait_s="
            f"{config.max_queue_wait_s:g}); retry later.",
            retry_after_s=max(wait, 1.0),
        )

"""A deterministic mock text engine that keeps vLLM's streaming contract.

The output depends only on the rendered prompt and (when temperature > 0) the seed, so
tests can predict it. The engine keeps its own clock: token ``k`` exists at
``start + first_delay + k * token_delay`` whether or not anyone has read the previous
ones, and a consumer that lags receives the tokens that piled up as one merged delta
(``num_tokens > 1``), exactly as vLLM's AsyncLLM does with delta outputs. Closing the
stream aborts it at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from typing import Any, AsyncIterator, Optional

from deployments.engines.base import plan_output_tokens
from deployments.engines.mock_agent import MOCK_VOCAB_SIZE, agent_plan, prompt_logprobs, token_logprob
from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import EngineFinishReason, EngineOutput, GenerationRequest, ToolCallDelta
from serve_app.settings import MockEngineConfig

__all__ = ["MockTextEngine", "render_prompt", "mock_completion_tokens"]

_VOCAB = (
    "the a troupe of actors streams tokens across ray serve replicas while gateways "
    "route requests to models that answer quickly and cheaply on small cpus or large "
    "gpus with care for latency cost and every dropped byte so clients see words "
    "arrive one by one"
).split()


def render_prompt(request: GenerationRequest) -> str:
    """The mock's 'chat template': one line per message, then the assistant tag."""
    if request.messages is not None:
        lines = [f"<{m.role}> {m.content}" for m in request.messages]
        lines.append("<assistant>")
        return "\n".join(lines)
    if request.prompt_token_ids is not None:
        return " ".join(_VOCAB[i % len(_VOCAB)] for i in request.prompt_token_ids)
    return request.prompt or ""


def _check_token_ids(request: GenerationRequest) -> None:
    """Token ids outside the mock's vocabulary are the client's error, as in a real engine."""
    bad = sorted(k for k in request.sampling.logit_bias if not 0 <= k < MOCK_VOCAB_SIZE)
    if bad:
        raise InvalidRequest(
            f"logit_bias keys {bad[:10]} are not token ids of this model "
            f"(its vocabulary has {MOCK_VOCAB_SIZE} tokens).", param="logit_bias")
    ids = request.prompt_token_ids or ()
    if any(not 0 <= i < MOCK_VOCAB_SIZE for i in ids):
        raise InvalidRequest(
            f"the prompt has token ids outside this model's vocabulary (0..{MOCK_VOCAB_SIZE - 1}).",
            param="prompt")


def _digest(prompt: str, seed: Optional[int], temperature: float) -> bytes:
    # Greedy (temperature 0) ignores the seed, like a real engine's argmax.
    salt = "greedy" if temperature == 0 else f"seed={seed}"
    return hashlib.blake2b(f"{salt}\x00{prompt}".encode(), digest_size=32).digest()


def mock_completion_tokens(
    prompt: str, seed: Optional[int], temperature: float, count: int
) -> list[str]:
    """The first ``count`` tokens the mock would produce (each carries its leading space)."""
    digest = _digest(prompt, seed, temperature)
    tokens = []
    for i in range(count):
        word = _VOCAB[(digest[i % 32] + 7 * i + (i // 32)) % len(_VOCAB)]
        tokens.append(word if i == 0 else " " + word)
    return tokens


def _cut_tokens(tokens: list[str], keep_chars: int) -> list[str]:
    """Keep the first ``keep_chars`` characters of the joined tokens, token by token.

    The stop string may span several tokens; every token that produced text before it is
    kept (the last one cut), and every token generated counts as generated.
    """
    out: list[str] = []
    used = 0
    for tok in tokens:
        take = max(0, min(len(tok), keep_chars - used))
        out.append(tok[:take])
        used += take
    return out


class MockTextEngine:
    """See the module docstring."""

    def __init__(self, model_id: str, config: MockEngineConfig) -> None:
        self.model_id = model_id
        self.config = config
        self.context_length = config.context_length
        self._active: dict[str, asyncio.Event] = {}
        #: Tool-call delta per planned token (agent_plan), for requests that call tools.
        self._deltas: dict[str, list[Optional[ToolCallDelta]]] = {}
        #: LoRA adapters "loaded" (issue 19): an adapter changes the output like a real one.
        self.adapters: set[str] = set()

    async def load_adapter(self, adapter_id: str, path: str) -> None:
        """Pretend to load an adapter (taking ``adapter_load_delay_ms``)."""
        if self.config.adapter_load_delay_ms:
            await asyncio.sleep(self.config.adapter_load_delay_ms / 1000.0)
        self.adapters.add(adapter_id)

    async def unload_adapter(self, adapter_id: str) -> None:
        self.adapters.discard(adapter_id)

    async def start(self) -> None:
        return None

    async def shutdown(self) -> None:
        for event in self._active.values():
            event.set()

    def active_requests(self) -> int:
        return len(self._active)

    def queue_stats(self) -> dict[str, Any]:
        """Queue gauges as the batching engines report them: the mock runs every request at
        once, so nothing ever waits."""
        return {"queue_depth": 0, "running": len(self._active), "expected_wait_s": 0.0}

    async def abort(self, request_id: str) -> None:
        event = self._active.get(request_id)
        if event is not None:
            event.set()

    def _plan(self, request: GenerationRequest) -> tuple[int, list[str], EngineFinishReason, Optional[str]]:
        _check_token_ids(request)
        prompt = render_prompt(request)
        prompt_tokens = max(1, len(prompt.split()))
        if request.adapter is not None:
            if request.adapter not in self.adapters:
                raise RuntimeError(f"adapter {request.adapter!r} is not loaded on this replica")
            prompt = f"<adapter {request.adapter}>\n{prompt}"
        sp = request.sampling
        limit = plan_output_tokens(
            self.context_length,
            prompt_tokens,
            sp.max_tokens,
            "messages" if request.messages is not None else "prompt",
            sp.default_max_tokens,
        )
        finish: EngineFinishReason
        agent = agent_plan(request)
        if agent is not None:
            pieces, self._deltas[request.request_id], finish = agent
            if len(pieces) > limit:
                pieces, finish = pieces[:limit], "length"
            return prompt_tokens, pieces, finish, None
        digest = _digest(prompt, sp.seed, sp.temperature)
        cfg = self.config
        span = max(cfg.max_output_tokens - cfg.min_output_tokens, 0)
        natural = cfg.min_output_tokens + (digest[0] % (span + 1))
        if cfg.ignore_eos or natural > limit:
            count, finish = limit, "length"
        else:
            count, finish = natural, "stop"
        tokens = mock_completion_tokens(prompt, sp.seed, sp.temperature, count)
        matched: Optional[str] = None
        if sp.stop:
            text = ""
            for i, tok in enumerate(tokens):
                text += tok
                hits = [(p, s) for s in sp.stop if (p := text.find(s)) >= 0]
                if hits:
                    hit, matched = min(hits, key=lambda h: h[0])
                    tokens = _cut_tokens(tokens[: i + 1], hit)
                    finish = "stop"
                    break
        return prompt_tokens, tokens, finish, matched

    def _extras(
        self, request: GenerationRequest, tokens: list[str], sent: int, ready: int
    ) -> dict:
        """The logprobs and tool-call fragments of tokens ``sent..ready`` (when asked for)."""
        extras: dict = {}
        k = request.sampling.logprobs
        if k is not None:
            extras["logprobs"] = [token_logprob(i, tokens[i], k)
                                  for i in range(sent, ready) if tokens[i]]
        deltas = self._deltas.get(request.request_id)
        if deltas is not None:
            extras["tool_calls"] = [d for d in deltas[sent:ready] if d is not None] or None
        return extras

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineOutput]:
        prompt_tokens, tokens, finish, matched = self._plan(request)
        echo = render_prompt(request) if request.sampling.echo else ""
        k = request.sampling.prompt_logprobs
        prompt_lp = None if k is None else prompt_logprobs(render_prompt(request), k)
        abort = asyncio.Event()
        self._active[request.request_id] = abort
        try:
            step = self.config.token_delay_ms / 1000.0
            first = (
                self.config.first_token_delay_ms / 1000.0
                if self.config.first_token_delay_ms is not None
                else step
            )
            start = time.monotonic()
            sent = 0
            total = len(tokens)
            if total == 0:
                yield EngineOutput(echo, 0, prompt_tokens, finish, matched, prompt_logprobs=prompt_lp)
                return
            while sent < total:
                if abort.is_set():
                    yield EngineOutput("", 0, prompt_tokens, "abort")
                    return
                now = time.monotonic()
                if now < start + first:
                    ready = 0
                elif step == 0:
                    ready = total
                else:
                    ready = min(total, math.floor((now - start - first) / step) + 1)
                if ready <= sent:
                    await asyncio.sleep(start + first + sent * step - now)
                    continue
                fail_at = self.config.fail_after_tokens
                if fail_at is not None and ready > fail_at:
                    if fail_at > sent:
                        yield EngineOutput("".join(tokens[sent:fail_at]), fail_at - sent, prompt_tokens)
                    raise RuntimeError(f"mock engine failure after {fail_at} tokens (configured)")
                done = ready == total
                yield EngineOutput(
                    echo + "".join(tokens[sent:ready]),
                    ready - sent,
                    prompt_tokens,
                    finish if done else None,
                    matched if done else None,
                    **self._extras(request, tokens, sent, ready),
                    prompt_logprobs=prompt_lp,
                )
                sent, echo, prompt_lp = ready, "", None
        finally:
            self._active.pop(request.request_id, None)
            self._deltas.pop(request.request_id, None)

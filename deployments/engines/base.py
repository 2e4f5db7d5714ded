"""The text engine interface (engines are built by ``deployments.engines.registry``).

An engine turns a :class:`~serve_app.protocol.internal.GenerationRequest` into an async
stream of :class:`~serve_app.protocol.internal.EngineOutput` deltas, following vLLM's
streaming contract:

* each output is a delta; a delta may carry several tokens (``num_tokens``) when the
  consumer lags behind the engine; the engine never slows down to wait for the consumer;
* the last output has ``finish_reason`` ``"stop"`` or ``"length"``;
* closing the async generator (``aclose()``, or cancelling the task iterating it) aborts
  the request: the engine stops generating within a bounded time and frees its slot, so
  ``active_requests()`` drops. ``abort(request_id)`` does the same from outside.

Adding an engine means adding a module and one entry in the registry
(``deployments/engines/registry.py``); no route and no deployment changes.
"""

from __future__ import annotations

from typing import AsyncIterator, Optional, Protocol, runtime_checkable

from serve_app.errors import ContextLengthExceeded, InvalidRequest
from serve_app.protocol.internal import EngineOutput, GenerationRequest

__all__ = ["TextEngine", "check_prompt_ids", "plan_output_tokens"]


@runtime_checkable
class TextEngine(Protocol):
    """What a text model deployment needs from an engine."""

    #: Prompt + completion token limit.
    context_length: int

    async def start(self) -> None:
        """Load weights / start background loops. Called once per replica."""

    def generate(self, request: GenerationRequest) -> AsyncIterator[EngineOutput]:
        """Stream deltas for one request (see the module docstring for the contract)."""

    async def abort(self, request_id: str) -> None:
        """Stop a running request; a no-op when it already finished."""

    def active_requests(self) -> int:
        """Requests the engine is working on right now (engine-side truth)."""

    async def shutdown(self) -> None:
        """Free resources; called when the replica stops."""


def plan_output_tokens(
    context_length: int,
    prompt_tokens: int,
    max_tokens: Optional[int],
    prompt_param: str = "messages",
    default_max_tokens: Optional[int] = None,
) -> int:
    """How many tokens to generate; raises ContextLengthExceeded when they do not fit.

    An explicit ``max_tokens`` must fit. Without one the engine generates up to
    ``default_max_tokens`` (the model's configured default), capped by the room the prompt
    leaves, or fills the context when there is no default (``SamplingParams.output_limit``).
    ``prompt_param`` names the request field to blame when the prompt alone is too long.
    """
    room = context_length - prompt_tokens
    details = {"context_length": context_length, "prompt_tokens": prompt_tokens}
    if max_tokens is None:
        if room <= 0:
            raise ContextLengthExceeded(
                f"This model's context is {context_length} tokens and the prompt alone uses "
                f"{prompt_tokens}, leaving no room for a completion. Shorten the prompt.",
                param=prompt_param,
                details=details,
            )
        return room if default_max_tokens is None else max(0, min(room, default_max_tokens))
    if max_tokens > room:
        raise ContextLengthExceeded(
            f"This model's context is {context_length} tokens; the prompt uses "
            f"{prompt_tokens} and max_tokens asks for {max_tokens}. Shorten the prompt or "
            f"lower max_tokens (at most {max(room, 0)} here).",
            param="max_tokens",
            details=dict(details, max_tokens=max_tokens),
        )
    return max(0, max_tokens)


def check_prompt_ids(ids: "tuple[int, ...] | list[int]", vocab_size: Optional[int]) -> list[int]:
    """A token-id prompt as a list, every id in the model's vocabulary (when it is known).

    Raises:
        InvalidRequest: an empty prompt, or ids outside ``0..vocab_size-1`` (named).
    """
    bad = [i for i in ids if vocab_size is not None and not 0 <= int(i) < vocab_size]
    if bad or not ids:
        limit = f"0..{vocab_size - 1}" if vocab_size is not None else "the vocabulary"
        raise InvalidRequest(
            f"prompt token ids must be in {limit}; not: {bad[:10] or 'an empty list'}.",
            param="prompt",
        )
    return [int(i) for i in ids]

"""Deadline-aware tier routing: ``start_within``.

``start_within`` is ``"default" | "priority" | "auto" | "HHh-MMm-SSs"`` (a duration of
5 s to 10 min, e.g. ``"00h-00m-30s"``):

* ``default``: the provider's standard tier (nothing sent);
* ``priority`` / ``auto``: sent as the provider's ``service_tier`` where it has one
  (OpenAI: both; Anthropic: ``auto``); a 400 where it has none (Gemini has neither);
* a duration: try the cheap tier first (the model's ``flex_pool``, another configured
  model such as spot or scale-to-zero replicas of the same weights, else OpenAI's
  ``service_tier="flex"``); if the request has not *started* (its first chunk reached the
  gateway) within the window, cancel it and run it on the standard tier, so it always completes (total time ≈ window +
  standard latency). A flex attempt that fails before starting with a capacity or server
  error (429, 5xx, timeout, overloaded) falls back at once.

Every caller shape takes both fields (chat completions, completions, Responses, Messages,
native); a client ``service_tier`` alone is checked against the provider's tiers
(Anthropic's ``standard_only`` included) and sent as is.

Validation errors are 400 ``INVALID_REQUEST`` on ``start_within``: a bad format or range,
a duration for a model without a flex tier (Anthropic, Gemini, local models), a client
``service_tier`` together with ``start_within``, ``priority``/``auto`` where the provider
has no such tier.

The tier that served each request is the ledger's ``tier`` column (``flex`` /
``standard`` / ``priority`` / ``auto``); a flex request is priced at the standard price
minus the engine's ``flex_discount`` (see :mod:`serve_app.pricing`), so the saving is
the difference. The flex attempt that was abandoned is metered separately (id
``<request id>:flex``, finish ``cancelled``, no tokens billed by the provider).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import re
from typing import Any, AsyncGenerator, Optional

from serve_app.errors import (
    InferenceFailed,
    InvalidRequest,
    Overloaded,
    RateLimitExceeded,
    Timeout,
)
from serve_app.protocol.internal import ChunkJoiner, GenerationRequest, TextChunk

__all__ = ["apply_start_within", "parse_duration", "stream_with_deadline", "MIN_S", "MAX_S"]

MIN_S, MAX_S = 5, 600
_DURATION = re.compile(r"^(\d{1,2})h-(\d{1,2})m-(\d{1,2})s$")
_EXAMPLE = ('"start_within": "00h-00m-30s" (try the flex tier, fall back to standard after '
            '30 s), or "default", "priority", "auto"')
#: Errors of a flex attempt (before it started) after which the standard tier is tried.
_FALL_BACK_ON = (Timeout, RateLimitExceeded, Overloaded, InferenceFailed)


def _bad(message: str) -> InvalidRequest:
    return InvalidRequest(f"{message} Example: {_EXAMPLE}.", param="start_within")


def parse_duration(value: str) -> float:
    """Seconds of an ``HHh-MMm-SSs`` duration within 5 s..10 min; InvalidRequest otherwise."""
    match = _DURATION.match(value)
    if not match:
        raise _bad(f"start_within {value!r} is not 'default', 'priority', 'auto' or a "
                   "duration written HHh-MMm-SSs.")
    hours, minutes, seconds = (int(g) for g in match.groups())
    if minutes > 59 or seconds > 59:
        raise _bad(f"start_within {value!r} has minutes or seconds above 59.")
    total = hours * 3600 + minutes * 60 + seconds
    if not MIN_S <= total <= MAX_S:
        raise _bad(f"start_within {value!r} is {total} s; it must be between {MIN_S} s and "
                   f"{MAX_S // 60} min.")
    return float(total)


def _tiers(model: Any) -> set[str]:
    """Service tiers the model's provider offers (a ``flex_pool`` model is a flex tier)."""
    engine = model.engine
    provider = model.provider
    if getattr(model, "flex_pool", None):
        return _tiers_of(provider, engine) | {"flex"}
    return _tiers_of(provider, engine)


def _tiers_of(provider: str, engine: Any) -> set[str]:
    if provider in ("openai", "azure"):
        tiers = {"priority", "auto"}
        if getattr(engine, "flex_tier", False):
            tiers.add("flex")
        return tiers
    if provider == "anthropic":
        return {"auto", "standard_only"}
    return {"flex"} if getattr(engine, "flex_tier", False) else set()


def apply_start_within(
    model: Any, request: GenerationRequest, start_within: Any, service_tier: Any
) -> None:
    """Validate the fields and set ``request.service_tier`` / ``request.start_within_s``."""
    tiers = _tiers(model)
    if start_within is None:
        if service_tier is not None:
            if not isinstance(service_tier, str) or service_tier not in tiers | {"default"}:
                raise InvalidRequest(
                    f"service_tier {service_tier!r} is not offered for model {model.id!r} "
                    f"(offered: {sorted(tiers) or 'none'}). Omit it, or use start_within.",
                    param="service_tier",
                )
            if service_tier != "default":
                request.service_tier = service_tier
        return
    if service_tier is not None:
        raise _bad("Send either service_tier or start_within, not both: start_within picks "
                   "the tier itself.")
    if not isinstance(start_within, str):
        raise _bad("start_within must be a string.")
    if start_within == "default":
        return
    if start_within in ("priority", "auto"):
        if start_within not in tiers:
            raise _bad(f"Model {model.id!r} ({model.provider}) has no {start_within!r} tier.")
        request.service_tier = start_within
        return
    window = parse_duration(start_within)
    if "flex" not in tiers:
        raise _bad(f"Model {model.id!r} ({model.provider}) has no cheaper flex tier to try "
                   "first, so a start_within duration does not apply; use 'default'.")
    request.start_within_s = window


async def stream_with_deadline(
    core: Any, model_id: str, request: GenerationRequest, info: Any
) -> AsyncGenerator[TextChunk, None]:
    """Flex first; the standard tier when flex has not started within the window."""
    window = request.start_within_s
    assert window is not None
    pool = core.models[model_id].flex_pool
    # The cheap tier: a configured local pool (another model id), else the provider's flex.
    flex = dataclasses.replace(request, request_id=request.request_id + ":flex",
                               service_tier=None if pool else "flex", start_within_s=None)
    chunks = core.stream(pool or model_id, flex, dataclasses.replace(info, tier="flex"))
    first: Optional[TextChunk] = None
    try:
        first = await asyncio.wait_for(chunks.__anext__(), window)
    except asyncio.TimeoutError:
        pass  # not started in time: the wait cancelled the flex attempt
    except StopAsyncIteration:
        pass
    except _FALL_BACK_ON:
        pass
    finally:
        if first is None:
            await chunks.aclose()
    if first is not None:
        try:
            yield first
            async for chunk in chunks:
                yield chunk
        finally:
            await chunks.aclose()
        return
    standard = dataclasses.replace(request, service_tier=None, start_within_s=None)
    chunks = core.stream(model_id, standard, dataclasses.replace(info, tier="standard"))
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        await chunks.aclose()


async def complete_with_deadline(
    core: Any, model_id: str, request: GenerationRequest, info: Any
) -> TextChunk:
    """The non-streaming form: the same tiers, the chunks joined into one result."""
    joiner = ChunkJoiner()
    queue_ms = None
    async with contextlib.aclosing(stream_with_deadline(core, model_id, request, info)) as chunks:
        async for chunk in chunks:
            joiner.add(chunk)
            if chunk.queue_ms is not None and queue_ms is None:
                queue_ms = chunk.queue_ms
            if chunk.finish_reason is not None:
                return joiner.joined(chunk, queue_ms, False)
    raise InferenceFailed(f"Model {model_id!r} ended the stream without a final chunk.")



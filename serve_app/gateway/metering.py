"""Per-request measurement at the gateway: what the metrics actor is told about a request.

A :class:`RequestMeter` follows one request through its chunks (a few attribute updates
per chunk) and turns into one :class:`RequestEvent` when the request ends, however it
ends: finished, failed, or cancelled (then usage is what was generated so far, which a
local engine knows exactly).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

from serve_app.policies.context import PRINCIPAL
from serve_app.protocol.internal import TextChunk
from serve_app.protocol.metrics import RequestEvent

__all__ = ["RequestInfo", "RequestMeter", "MAX_GAP_SAMPLES", "key_id"]

#: Inter-token samples kept per request (the histogram needs a sample, not every gap).
MAX_GAP_SAMPLES = 256


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """Who asked, and through which route (set by the route, read by metering)."""

    route: str
    stream: bool = False
    key_id: str = "anonymous"
    tier: str = "default"
    #: Takes the finished request's event instead of the metrics recorder; the caller
    #: records it later with figures only it knows (a realtime response's audio, TTFA).
    hold: Optional[Callable[[RequestEvent], None]] = None


class RequestMeter:
    """Timings and usage of one request, from the gateway's point of view."""

    __slots__ = (
        "request_id", "model", "provider", "info", "started", "last", "ttft_ms", "gaps",
        "prompt_tokens", "completion_tokens", "queue_ms", "finish_reason", "cold_start",
        "adapter", "adapter_load_ms", "cached_tokens",
    )

    def __init__(
        self, request_id: str, model: str, info: RequestInfo, provider: str = "local"
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.provider = provider
        self.info = info
        self.started = time.perf_counter()
        self.last: Optional[float] = None
        self.ttft_ms: Optional[float] = None
        self.gaps: list[float] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.queue_ms: Optional[float] = None
        self.finish_reason: Optional[str] = None
        self.cold_start = False
        #: LoRA adapter the request ran with: metered as model "<base>:<adapter>".
        self.adapter: Optional[str] = None
        self.adapter_load_ms: Optional[float] = None
        #: Of the prompt tokens: those the provider served from its prompt cache.
        self.cached_tokens = 0

    def chunk(self, chunk: TextChunk) -> None:
        """Account for one chunk as it arrives from the model deployment."""
        now = time.perf_counter()
        if chunk.queue_ms is not None:
            self.queue_ms = chunk.queue_ms
        if chunk.cold_start:
            self.cold_start = True
        if chunk.prompt_tokens:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.num_tokens:
            if self.last is None:
                self.ttft_ms = (now - self.started) * 1000.0
            elif len(self.gaps) < MAX_GAP_SAMPLES:
                # A delta carrying n tokens stands for n gaps of 1/n of the wait each.
                per_token = (now - self.last) * 1000.0 / chunk.num_tokens
                self.gaps.extend([per_token] * min(chunk.num_tokens, MAX_GAP_SAMPLES - len(self.gaps)))
            self.last = now
            self.completion_tokens += chunk.num_tokens
        if chunk.adapter_load_ms is not None:
            self.adapter_load_ms = chunk.adapter_load_ms
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.completion_tokens = chunk.completion_tokens
            self.prompt_tokens = chunk.prompt_tokens
            self.cached_tokens = chunk.cached_tokens

    def finished(self, chunk: TextChunk) -> None:
        """A unary result: the whole answer arrives at once, so its first token does too
        (TTFT equals the time to the response)."""
        self.chunk(chunk)

    def event(self, status: int = 200, error_code: Optional[str] = None) -> RequestEvent:
        finish = self.finish_reason
        if finish is None and error_code is None:
            finish = "cancelled"  # ended without a final chunk or an error: the caller left
        # A local engine's counts are exact at every chunk. A remote provider reports usage
        # only in its last chunk: without it, the tokens were counted here, not reported.
        estimated = self.provider != "local" and self.finish_reason is None
        return RequestEvent(
            event_id=self.request_id,
            ts=time.time(),
            model=self.model if self.adapter is None else f"{self.model}:{self.adapter}",
            route=self.info.route,
            provider=self.provider,
            key_id=key_id(self.info),
            tier=self.info.tier,
            status=status,
            error_code=error_code,
            finish_reason=finish,
            stream=self.info.stream,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            usage_estimated=estimated,
            queue_ms=self.queue_ms,
            ttft_ms=self.ttft_ms,
            e2e_ms=(time.perf_counter() - self.started) * 1000.0,
            inter_token_ms=self.gaps,
            cold_start=self.cold_start,
            adapter_load_ms=self.adapter_load_ms,
            cached_tokens=self.cached_tokens,
        )


def key_id(info: RequestInfo) -> str:
    """The route's key id, else the caller's (set by the policy layer), else anonymous."""
    if info.key_id != "anonymous":
        return info.key_id
    principal = PRINCIPAL.get()
    return principal.key_id if principal is not None else info.key_id

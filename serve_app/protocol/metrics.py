"""Metrics events: what replicas and the gateway report about each finished request.

One :class:`RequestEvent` per request, created where the request finished (the gateway,
which sees client-visible latency) and carried in batches to the metrics actor, which
prices it and appends it to the ledger. ``event_id`` makes appends idempotent, so a batch
that is retried after a lost acknowledgement is never counted twice.
Imports neither Ray nor torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

__all__ = ["RequestEvent", "LedgerEntry", "LATENCY_FIELDS"]


@dataclass(slots=True)
class RequestEvent:
    """A finished request, as measured (no price yet)."""

    event_id: str                 # unique per request (the request id)
    ts: float                     # unix time the request finished
    model: str
    route: str                    # e.g. "/v1/chat/completions", "/ws", "/inference/stream"
    provider: str = "local"       # "local" or the remote provider ("openai", ...)
    key_id: str = "anonymous"     # API key id (never the secret)
    tier: str = "default"         # deadline tier (default | flex | priority)
    status: int = 200             # HTTP status (or the status the error maps to)
    error_code: Optional[str] = None  # Troupe error code (upper case) when it failed
    finish_reason: Optional[str] = None  # stop | length | cancelled | None on error
    stream: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    usage_estimated: bool = False  # True when tokens were counted, not reported
    queue_ms: Optional[float] = None
    ttft_ms: Optional[float] = None
    e2e_ms: float = 0.0
    inter_token_ms: list[float] = field(default_factory=list)  # gaps between chunks, per token
    replica_busy_s: Optional[float] = None  # engine time share (replica-hour pricing)
    cold_start: bool = False      # waited for its replica to start (scale from zero)
    adapter_load_ms: Optional[float] = None  # waited this long for its LoRA adapter to load
    cached_tokens: int = 0        # of prompt_tokens: served from a prompt cache (cached rate)
    # A realtime response (its text model's row): audio heard and spoken, and the time from
    # the end of the user's speech to the first audio sent back.
    audio_in_s: Optional[float] = None
    audio_out_s: Optional[float] = None
    ttfa_ms: Optional[float] = None


@dataclass(slots=True)
class LedgerEntry:
    """A priced event: one row of the persistent cost ledger."""

    event: RequestEvent
    cost_usd: float
    cost_estimated: bool          # usage or price was estimated (flagged in /v1/usage)
    price_source: str             # e.g. "config", "table:openai 2026-10-01", "replica-hour"


LATENCY_FIELDS = ("queue_ms", "ttft_ms", "e2e_ms", "ttfa_ms")

"""The one internal request/response vocabulary shared by the gateway, deployments and engines.

Every API family (OpenAI chat and completions, native REST, WebSocket) is translated into a
``GenerationRequest`` at the gateway; engines only ever see this type. The types are small
slotted dataclasses because they cross a Ray handle on every request and every stream chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

__all__ = [
    "ChatMessage",
    "SamplingParams",
    "GenerationRequest",
    "EngineOutput",
    "TextChunk",
    "EngineFinishReason",
    "WireFinishReason",
]

#: What an engine may report. ``abort`` follows vLLM: the request was cancelled.
EngineFinishReason = Literal["stop", "length", "abort"]
#: What the wire shows. ``abort`` becomes ``cancelled`` at the deployment.
WireFinishReason = Literal["stop", "length", "cancelled"]


@dataclass(slots=True)
class ChatMessage:
    """One chat turn; ``content`` is already flattened to text."""

    role: str
    content: str


@dataclass(slots=True)
class SamplingParams:
    """Sampling controls common to every text engine.

    ``max_tokens`` is what the client asked for (an error if it does not fit the
    context). When it is None the engine generates up to ``default_max_tokens`` (the
    model's configured default), capped by the room the prompt leaves in the context.
    """

    max_tokens: Optional[int] = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    default_max_tokens: Optional[int] = None

    def output_limit(self, room: int) -> int:
        """Tokens to generate given ``room`` left in the context (after validation)."""
        if self.max_tokens is not None:
            return self.max_tokens
        if self.default_max_tokens is not None:
            return min(room, self.default_max_tokens)
        return room


@dataclass(slots=True)
class GenerationRequest:
    """A text generation request: exactly one of ``messages`` (chat) or ``prompt`` (raw)."""

    request_id: str
    sampling: SamplingParams = field(default_factory=SamplingParams)
    messages: Optional[list[ChatMessage]] = None
    prompt: Optional[str] = None
    #: Unix time the gateway sent it (the deployment measures queue wait from it).
    dispatched_at: float = 0.0
    #: W3C trace context (``traceparent``/``tracestate``) of the gateway's span.
    trace_context: Optional[dict[str, str]] = None
    #: Remote provider service tier ("flex", "priority", ...); None: the provider default.
    service_tier: Optional[str] = None
    #: start_within window: try flex first, fall back to standard after this many seconds.
    start_within_s: Optional[float] = None
    #: LoRA adapter id to run with (None: the base model) and its local folder (issue 19).
    adapter: Optional[str] = None
    adapter_path: Optional[str] = None


@dataclass(slots=True)
class EngineOutput:
    """One delta from an engine (vLLM's DELTA output kind).

    ``text`` may carry several tokens when the consumer lagged behind the engine;
    ``num_tokens`` says how many. ``prompt_tokens`` is set on every output so the
    consumer never has to wait for the last one to know it.
    """

    text: str
    num_tokens: int
    prompt_tokens: int
    finish_reason: Optional[EngineFinishReason] = None
    #: On a ``stop`` finish: the stop string that ended the output (None for EOS, or when
    #: the engine cannot tell, e.g. an upstream that does not say).
    stop_sequence: Optional[str] = None


@dataclass(slots=True)
class TextChunk:
    """What a model deployment streams back to the gateway.

    The final chunk has ``finish_reason`` set and carries the exact usage the engine
    reported (``completion_tokens`` is cumulative there).
    """

    text: str
    num_tokens: int
    finish_reason: Optional[WireFinishReason] = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: Set on the first chunk only: ms between the gateway's dispatch and the replica start.
    queue_ms: Optional[float] = None
    #: Final chunk only: the stop string that ended the output (see EngineOutput).
    stop_sequence: Optional[str] = None
    #: First chunk only: the request was sent before its replica was up (a cold start).
    cold_start: bool = False
    #: Final chunk only: ms this request waited for its adapter to load (None: already loaded).
    adapter_load_ms: Optional[float] = None
    #: Final chunk only: the replica that served it (its Serve replica id, else its pid).
    replica: Optional[str] = None

    def usage(self) -> dict[str, int]:
        """OpenAI-style usage of a final chunk."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

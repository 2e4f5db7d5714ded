"""The one internal request/response vocabulary shared by the gateway, deployments and engines.

Every API family (OpenAI chat and completions, native REST, WebSocket) is translated into a
``GenerationRequest`` at the gateway; engines only ever see this type. The types are small
slotted dataclasses because they cross a Ray handle on every request and every stream chunk.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

__all__ = [
    "TextPart",
    "ImagePart",
    "ContentPart",
    "ToolCall",
    "ChatMessage",
    "ToolSpec",
    "NamedTool",
    "ToolChoice",
    "ResponseFormat",
    "SamplingParams",
    "GenerationRequest",
    "TokenLogprob",
    "ToolCallDelta",
    "EngineOutput",
    "TextChunk",
    "EngineFinishReason",
    "WireFinishReason",
    "MAX_TOP_LOGPROBS",
    "merge_tool_call_deltas",
    "ChunkJoiner",
]

#: What an engine may report. ``abort`` follows vLLM: the request was cancelled;
#: ``tool_calls``: the output ended with one or more complete tool calls.
EngineFinishReason = Literal["stop", "length", "abort", "tool_calls"]
#: What the wire shows. ``abort`` becomes ``cancelled`` at the deployment.
WireFinishReason = Literal["stop", "length", "cancelled", "tool_calls"]
#: The most alternatives a client may ask for per token (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


@dataclass(slots=True, frozen=True)
class TextPart:
    """A text content part of a chat message."""

    text: str


@dataclass(slots=True, frozen=True)
class ImagePart:
    """An image content part: a ``data:`` URL, or an http(s) URL the gateway allowed."""

    url: str
    detail: Optional[str] = None


ContentPart = Union[TextPart, ImagePart]


@dataclass(slots=True, frozen=True)
class ToolCall:
    """A complete tool call the model made; ``arguments`` is a JSON text (as OpenAI sends it)."""

    id: str
    name: str
    arguments: str


@dataclass(slots=True)
class ChatMessage:
    """One chat turn.

    ``content`` is always the flattened text so engines that only read text keep working;
    ``parts`` keeps the ordered text and image parts when the client sent parts.
    An assistant turn may carry ``tool_calls``; a ``tool`` turn answers one by
    ``tool_call_id``.
    """

    role: str
    content: str
    parts: tuple[ContentPart, ...] = ()
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: Optional[str] = None
    name: Optional[str] = None
    #: A prompt-cache breakpoint at the end of this turn, as a Messages caller marked it
    #: (Anthropic's ``cache_control``, e.g. ``{"type": "ephemeral"}``); providers that
    #: cache prefixes on their own ignore it.
    cache_control: Optional[dict[str, Any]] = None

    def has_images(self) -> bool:
        """Whether any part of this turn is an image."""
        return any(isinstance(p, ImagePart) for p in self.parts)


@dataclass(slots=True, frozen=True)
class ToolSpec:
    """A function the model may call; ``parameters`` is a JSON Schema object."""

    name: str
    description: Optional[str] = None
    parameters: dict = field(default_factory=lambda: {"type": "object", "properties": {}})
    strict: bool = False


@dataclass(slots=True, frozen=True)
class NamedTool:
    """A tool choice that forces a call of the named tool."""

    name: str


#: ``auto``: the model decides; ``none``: no call; ``required``: at least one call.
ToolChoice = Union[Literal["auto", "none", "required"], NamedTool]


@dataclass(slots=True, frozen=True)
class ResponseFormat:
    """The shape the output must take.

    ``json_object``: any JSON object; ``json_schema``: an instance of ``schema``
    (``strict``: the engine must enforce it, not merely prompt for it).
    """

    type: Literal["text", "json_object", "json_schema"] = "text"
    schema: Optional[dict] = None
    name: Optional[str] = None
    strict: bool = False

    def __post_init__(self) -> None:
        if self.type == "json_schema" and not isinstance(self.schema, dict):
            raise ValueError("a json_schema response format needs a schema object")


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
    #: None: no logprobs; k in 0..MAX_TOP_LOGPROBS: the sampled token's logprob plus top k.
    logprobs: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    #: Token id -> bias added to its logit (-100 bans, +100 forces in practice).
    logit_bias: dict[int, float] = field(default_factory=dict)
    #: Completions with a token-id prompt: the engine's first output starts with the
    #: detokenized prompt (the gateway echoes text prompts itself, so it is False there).
    echo: bool = False
    #: Completions with ``echo`` and ``logprobs``: the engine's first output carries the
    #: prompt tokens' logprobs with this many alternatives (None: not asked for).
    prompt_logprobs: Optional[int] = None

    def output_limit(self, room: int) -> int:
        """Tokens to generate given ``room`` left in the context (after validation)."""
        if self.max_tokens is not None:
            return self.max_tokens
        if self.default_max_tokens is not None:
            return min(room, self.default_max_tokens)
        return room


@dataclass(slots=True)
class GenerationRequest:
    """A text generation request: exactly one of ``messages`` (chat), ``prompt`` (text) or
    ``prompt_token_ids`` (completions' token-id prompts; always raw)."""

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
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True
    response_format: Optional[ResponseFormat] = None
    #: A ``prompt`` is sent as is; otherwise a prompt for a chat model is one user turn.
    raw: bool = False
    #: A prompt given as token ids (``prompt`` is then None); ids are checked by the engine.
    prompt_token_ids: Optional[tuple[int, ...]] = None
    #: The caller's API key id: local engines take turns across keys in their queue.
    api_key_id: Optional[str] = None
    #: Queue class at local engines: "interactive" goes before "batch" (batch jobs).
    priority: Literal["interactive", "batch"] = "interactive"
    #: LoRA adapter id to run with (None: the base model) and its local folder (issue 19).
    adapter: Optional[str] = None
    adapter_path: Optional[str] = None
    #: OpenAI's ``prompt_cache_key``: requests sharing it go to the replica that holds their
    #: prefix (``serve_app.build.session_router``); None: routed by a prompt-prefix digest.
    #: Remote OpenAI engines forward it (``OpenAIEngineConfig.prompt_cache_key``); Anthropic
    #: and Gemini have no such field (their caches key on the prompt itself) and get
    #: nothing: it is a routing hint, so dropping it changes no answer.
    session_key: Optional[str] = None

    def has_images(self) -> bool:
        """Whether any message carries an image part."""
        return any(m.has_images() for m in self.messages or ())

    def tool_named(self, name: str) -> Optional[ToolSpec]:
        """The tool spec called ``name``, if the request declares one."""
        return next((t for t in self.tools if t.name == name), None)


@dataclass(slots=True, frozen=True)
class TokenLogprob:
    """One generated token's log probability, with the ``top`` alternatives.

    ``top`` holds ``(token, token_id, logprob)`` triples, most likely first.
    """

    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, int, float], ...] = ()


@dataclass(slots=True, frozen=True)
class ToolCallDelta:
    """A fragment of a tool call as OpenAI streams it.

    ``id`` and ``name`` come in the first delta of a call (``index`` counts calls from
    0); later deltas of that call carry only ``arguments`` fragments.
    """

    index: int
    id: Optional[str] = None
    name: Optional[str] = None
    arguments: str = ""


def merge_tool_call_deltas(deltas: "list[ToolCallDelta]") -> list[ToolCall]:
    """Reassemble streamed tool-call fragments into complete calls, ordered by index."""
    ids: dict[int, str] = {}
    names: dict[int, str] = {}
    args: dict[int, list[str]] = {}
    for d in deltas:
        if d.id is not None:
            ids[d.index] = d.id
        if d.name is not None:
            names[d.index] = d.name
        args.setdefault(d.index, []).append(d.arguments)
    return [ToolCall(ids.get(i, ""), names.get(i, ""), "".join(args[i])) for i in sorted(args)]


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
    #: One entry per token in ``text`` when the request asked for logprobs.
    logprobs: Optional[list[TokenLogprob]] = None
    #: Tool-call fragments parsed from the output (the text then carries none of it).
    tool_calls: Optional[list[ToolCallDelta]] = None
    #: Prompt tokens served from a cached prefix (not recomputed).
    cached_tokens: int = 0
    #: First output only, when ``prompt_logprobs`` was asked for: one entry per prompt
    #: token; the first token's ``logprob`` means nothing (no token precedes it).
    prompt_logprobs: Optional[list[TokenLogprob]] = None


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
    #: As on EngineOutput.
    logprobs: Optional[list[TokenLogprob]] = None
    tool_calls: Optional[list[ToolCallDelta]] = None
    #: Final chunk only: prompt tokens the engine served from a cached prefix.
    cached_tokens: int = 0
    #: Final chunk only: ms this request waited for its adapter to load (None: already loaded).
    adapter_load_ms: Optional[float] = None
    #: Final chunk only: the replica that served it (its Serve replica id, else its pid).
    replica: Optional[str] = None
    #: As on EngineOutput (first chunk only).
    prompt_logprobs: Optional[list[TokenLogprob]] = None

    def usage(self) -> dict[str, Any]:
        """OpenAI-style usage of a final chunk (``prompt_tokens_details`` when a prefix was cached)."""
        usage: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }
        if self.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.cached_tokens}
        return usage


class ChunkJoiner:
    """Joins a stream of chunks into the one chunk a unary call returns.

    Text is concatenated, logprobs are appended in order, and tool-call fragments are
    reassembled so the joined chunk carries one whole delta per call.
    """

    __slots__ = ("_text", "_logprobs", "_deltas", "_prompt_logprobs")

    def __init__(self) -> None:
        self._text: list[str] = []
        self._logprobs: Optional[list[TokenLogprob]] = None
        self._deltas: list[ToolCallDelta] = []
        self._prompt_logprobs: Optional[list[TokenLogprob]] = None

    def add(self, chunk: TextChunk) -> None:
        """Take one streamed chunk."""
        self._text.append(chunk.text)
        if chunk.logprobs is not None:
            self._logprobs = (self._logprobs or []) + list(chunk.logprobs)
        if chunk.tool_calls:
            self._deltas.extend(chunk.tool_calls)
        if chunk.prompt_logprobs is not None:
            self._prompt_logprobs = chunk.prompt_logprobs

    def joined(self, last: TextChunk, queue_ms: Optional[float], cold_start: bool) -> TextChunk:
        """The whole result, with the usage and finish of ``last`` (the final chunk)."""
        calls = merge_tool_call_deltas(self._deltas)
        return TextChunk(
            "".join(self._text),
            last.completion_tokens,
            last.finish_reason,
            last.prompt_tokens,
            last.completion_tokens,
            queue_ms,
            stop_sequence=last.stop_sequence,
            cold_start=cold_start,
            logprobs=self._logprobs,
            tool_calls=[ToolCallDelta(i, c.id, c.name, c.arguments) for i, c in enumerate(calls)]
            or None,
            cached_tokens=last.cached_tokens,
            adapter_load_ms=last.adapter_load_ms,
            replica=last.replica,
            prompt_logprobs=self._prompt_logprobs,
        )

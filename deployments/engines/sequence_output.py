"""What a local engine adds to one sequence's output beyond text: logits processors for the
request, logprobs per token, tool calls parsed out of the text, and the end of a
constrained output.

The engine keeps its own decode / stop-string loop and calls, per sequence:
:meth:`SequenceOutput.on_token` with each sampled token (returns True when the grammar is
complete, so the sequence should end there), :meth:`SequenceOutput.shape` with each text
delta it is about to send (returns the text outside tool calls, the tool-call fragments
and the logprobs of the tokens since the last delta), and :meth:`finish_reason` at the end.
"""

from __future__ import annotations

from typing import Any, Optional

from deployments.engines.logits import LogprobRecorder, build_logits_processors, grammar_of
from deployments.engines.tool_parsers import parser_for
from serve_app.protocol.internal import (
    EngineFinishReason,
    GenerationRequest,
    TokenLogprob,
    ToolCallDelta,
)

__all__ = ["SequenceOutput", "Shaped"]

Shaped = tuple[str, Optional[list[TokenLogprob]], Optional[list[ToolCallDelta]]]


class SequenceOutput:
    """Per-sequence processors and output shaping (see the module docstring)."""

    def __init__(self, request: GenerationRequest, tokenizer: Any, tool_call_parser: Optional[str] = "hermes") -> None:
        self.processors: list = build_logits_processors(request, tokenizer)
        self._grammar = grammar_of(self.processors)
        self._recorder: Optional[LogprobRecorder] = None
        if request.sampling.logprobs is not None:
            self._recorder = LogprobRecorder(request.sampling.logprobs, tokenizer)
            self.processors.append(self._recorder)
        self._logprobs: list[TokenLogprob] = []
        self._parser = parser_for(request, tool_call_parser)

    @property
    def wants_logprobs(self) -> bool:
        """Whether the request asked for logprobs."""
        return self._recorder is not None

    def on_token(self, token: int, is_eos: bool = False) -> bool:
        """Record a sampled token; True when the grammar admits nothing more after it."""
        if self._recorder is not None and not is_eos:
            entry = self._recorder.take(token)
            if entry is not None:
                self._logprobs.append(entry)
        if self._grammar is not None and not is_eos:
            return self._grammar.accept(token)
        return False

    def shape(self, text: str, final: bool = False) -> Shaped:
        """The delta to send for ``text`` (``final``: the output ended, flush what is held)."""
        deltas: Optional[list[ToolCallDelta]] = None
        if self._parser is not None:
            text, found = self._parser.feed(text)
            if final:
                tail, more = self._parser.finish()
                text, found = text + tail, found + more
            deltas = found or None
        logprobs: Optional[list[TokenLogprob]] = None
        if self._recorder is not None and (self._logprobs or final):
            logprobs, self._logprobs = self._logprobs, []
        return text, logprobs, deltas

    def finish_reason(self, reason: EngineFinishReason) -> EngineFinishReason:
        """``tool_calls`` instead of ``stop`` when the output ended with calls."""
        if reason == "stop" and self._parser is not None and self._parser.calls_made:
            return "tool_calls"
        return reason

"""Gemini ``GenerateContentResponse`` objects, whole and streamed, from internal results.

A candidate's ``content.parts`` hold its text and then one ``functionCall`` part per tool
call (arguments parsed to ``args``, with the call id Troupe synthesized, so a client that
echoes ids back gets exact matching). ``finishReason``: ``STOP`` (also after tool calls, as
Gemini does) or ``MAX_TOKENS``. Streams are data-only SSE events, each a partial response;
text streams as it is generated, function calls arrive whole in the event that finishes
their candidate (Gemini never streams argument fragments), and the last event carries the
complete ``usageMetadata``.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import orjson

from serve_app.protocol.internal import (
    TextChunk,
    TokenLogprob,
    ToolCallDelta,
    merge_tool_call_deltas,
)

__all__ = [
    "finish_reason_of",
    "function_call_parts",
    "candidate",
    "usage_metadata",
    "response_object",
    "GeminiStream",
]


def finish_reason_of(finish: Optional[str]) -> Optional[str]:
    """Gemini's ``finishReason`` for an internal finish reason."""
    if finish is None:
        return None
    return "MAX_TOKENS" if finish == "length" else "STOP"


def function_call_parts(deltas: Optional[list[ToolCallDelta]]) -> list[dict[str, Any]]:
    """One ``functionCall`` part per finished call (a cut-off call keeps its raw text)."""
    parts = []
    for d in deltas or ():
        try:
            args = json.loads(d.arguments or "{}")
        except ValueError:  # cut off by maxOutputTokens: keep what there is
            args = {"_partial": d.arguments}
        parts.append({"functionCall": {"id": d.id, "name": d.name, "args": args}})
    return parts


def _logprob_candidates(entry: TokenLogprob, top: int) -> dict[str, Any]:
    return {"candidates": [{"token": t, "tokenId": i, "logProbability": lp}
                           for t, i, lp in entry.top[:top]]}


def _logprobs_fields(entries: Optional[list[TokenLogprob]], top: int) -> dict[str, Any]:
    if not entries:
        return {}
    chosen = [{"token": e.token, "tokenId": e.token_id, "logProbability": e.logprob}
              for e in entries]
    return {
        "logprobsResult": {"topCandidates": [_logprob_candidates(e, top) for e in entries],
                           "chosenCandidates": chosen},
        "avgLogprobs": sum(e.logprob for e in entries) / len(entries),
    }


def candidate(
    index: int, text: str, calls: Optional[list[ToolCallDelta]], finish: Optional[str],
    logprobs: Optional[list[TokenLogprob]] = None, top: int = 0,
) -> dict[str, Any]:
    """One candidate (a stream event's candidate has only what is new)."""
    parts: list[dict[str, Any]] = [{"text": text}] if text else []
    parts += function_call_parts(calls)
    out: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": index}
    reason = finish_reason_of(finish)
    if reason is not None:
        out["finishReason"] = reason
    out.update(_logprobs_fields(logprobs, top))
    return out


def usage_metadata(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    usage = {"promptTokenCount": prompt, "candidatesTokenCount": completion,
             "totalTokenCount": prompt + completion}
    if cached:
        usage["cachedContentTokenCount"] = cached
    return usage


def response_object(
    candidates: list[dict[str, Any]], usage: dict[str, Any], model: str, response_id: str
) -> dict[str, Any]:
    return {"candidates": candidates, "usageMetadata": usage, "modelVersion": model,
            "responseId": response_id}


class GeminiStream:
    """Encodes one streamed response, candidate by candidate, as SSE ``data:`` JSON texts.

    Tool-call fragments are kept per candidate until its finish chunk; usage adds up over
    the candidates that finished (prompt tokens counted once, as in a unary response).
    """

    def __init__(self, model: str, response_id: str, top: int) -> None:
        self.model = model
        self.response_id = response_id
        self.top = top
        self._calls: dict[int, list[ToolCallDelta]] = {}
        self._prompt = 0
        self._completion = 0
        self._cached = 0

    def event(self, index: int, chunk: TextChunk) -> Optional[str]:
        """The event for one chunk of candidate ``index`` (None: nothing new to send)."""
        if chunk.tool_calls:
            self._calls.setdefault(index, []).extend(chunk.tool_calls)
        self._prompt = max(self._prompt, chunk.prompt_tokens)
        calls = None
        if chunk.finish_reason is not None:
            self._completion += chunk.completion_tokens
            self._cached = max(self._cached, chunk.cached_tokens)
            merged = _merge(self._calls.pop(index, []))
            calls = merged or None
        elif not chunk.text and not chunk.logprobs:
            return None
        body = response_object(
            [candidate(index, chunk.text, calls, chunk.finish_reason, chunk.logprobs, self.top)],
            usage_metadata(self._prompt, self._completion, self._cached), self.model,
            self.response_id)
        return orjson.dumps(body).decode()


def _merge(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    return [ToolCallDelta(i, c.id, c.name, c.arguments)
            for i, c in enumerate(merge_tool_call_deltas(deltas))]

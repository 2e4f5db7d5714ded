"""Constrained decoding for the local engines: a request's response format or forced tool
call compiled into an llguidance grammar, applied per sequence as a logits processor.

Why llguidance (measured by ``bench/grammar_bench.py`` on the bundled SmolLM2 tokenizer,
results in ``bench/results/*-grammar.md``): the cheapest mask per token of the three
libraries evaluated (xgrammar, llguidance, outlines-core), a few milliseconds to compile a
20-property schema, and it *refuses* a schema keyword it cannot enforce, naming it, where
xgrammar accepts e.g. ``uniqueItems`` and silently does not enforce it. A request whose
schema cannot be enforced must be a 400, not free text.

What gets constrained (:func:`constraint_schema`):

* ``response_format`` ``json_object``: any JSON object; ``json_schema``: the schema.
* ``tool_choice`` named: the named tool's ``parameters`` (the output *is* the arguments).
* ``tool_choice`` required: ``{"name": <one of the tools>, "arguments": <its parameters>}``.

Compiled grammars are cached by the schema's hash in a bounded LRU per tokenizer; every
sequence gets its own copy of the matcher (:class:`GrammarProcessor`).
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
from typing import TYPE_CHECKING, Any, Optional

from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import GenerationRequest, NamedTool

if TYPE_CHECKING:  # llguidance is imported where a grammar is compiled
    from llguidance._lib import JsonCompileOptions

__all__ = [
    "GrammarCache",
    "GrammarProcessor",
    "constraint_schema",
    "forced_tool_schema",
    "grammar_cache_for",
]

#: Compact JSON: a small model given free whitespace can loop on newlines forever.
_JSON_DEFAULTS: "JsonCompileOptions" = {"whitespace_flexible": False}


def forced_tool_schema(request: GenerationRequest) -> Optional[dict]:
    """The schema a forced tool call must match, or None when no call is forced.

    Raises:
        InvalidRequest: the named tool is not among the request's tools, or a call is
            required but no tools were given.
    """
    choice = request.tool_choice
    if isinstance(choice, NamedTool):
        tool = request.tool_named(choice.name)
        if tool is None:
            raise InvalidRequest(
                f"tool_choice names {choice.name!r}, which is not among the request's tools.",
                param="tool_choice",
            )
        return tool.parameters or {"type": "object"}
    if choice != "required":
        return None
    if not request.tools:
        raise InvalidRequest("tool_choice 'required' needs at least one tool.", param="tool_choice")
    shapes = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, "arguments": t.parameters or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in request.tools
    ]
    return shapes[0] if len(shapes) == 1 else {"anyOf": shapes}


def constraint_schema(request: GenerationRequest) -> tuple[Optional[dict], str]:
    """(schema the output must match, the request field it came from), or (None, "")."""
    forced = forced_tool_schema(request)
    if forced is not None:
        return forced, "tools"
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None, ""
    if fmt.type == "json_object":
        return {"type": "object"}, "response_format"
    return fmt.schema, "response_format"


class GrammarCache:
    """Compiled grammars for one tokenizer, keyed by schema hash (bounded LRU, thread-safe)."""

    def __init__(self, tokenizer: Any, max_entries: int = 128) -> None:
        import llguidance.hf

        self.max_entries = max_entries
        self.vocab_size = len(tokenizer)
        self.llg_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size)
        self._entries: collections.OrderedDict[str, Any] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(schema: dict) -> str:
        """The cache key: a hash of the schema's canonical JSON."""
        text = json.dumps(schema, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def matcher(self, schema: dict, param: str = "response_format") -> Any:
        """A fresh matcher for ``schema`` (compiled once, copied per sequence).

        Raises:
            InvalidRequest: the schema uses a keyword the grammar library cannot enforce,
                or is not a valid schema (``param`` names the request field).
        """
        key = self.key(schema)
        with self._lock:
            proto = self._entries.get(key)
            if proto is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return proto.deep_copy()
        proto = self._compile(schema, param)
        with self._lock:
            self.misses += 1
            self._entries[key] = proto
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return proto.deep_copy()

    def __len__(self) -> int:
        return len(self._entries)

    def _compile(self, schema: dict, param: str) -> Any:
        import llguidance

        if not isinstance(schema, dict):
            raise InvalidRequest("The JSON schema must be an object.", param=param)
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_DEFAULTS)
            matcher = llguidance.LLMatcher(self.llg_tokenizer, grammar)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise InvalidRequest(_schema_error(str(exc)), param=param) from None
        if matcher.is_error():
            raise InvalidRequest(_schema_error(matcher.get_error()), param=param)
        return matcher


def _schema_error(detail: str) -> str:
    """A client-facing message for a schema the library refused, naming the keywords."""
    unsupported = re.search(r"Unimplemented keys: \[([^\]]*)\]", detail)
    if unsupported:
        keys = unsupported.group(1).replace('"', "")
        return f"The JSON schema uses keywords this model's engine cannot enforce: {keys}."
    first = detail.strip().splitlines()[0] if detail.strip() else "unknown error"
    return f"The JSON schema cannot be enforced: {first[:300]}"


_caches: dict[int, GrammarCache] = {}
_caches_lock = threading.Lock()


def grammar_cache_for(tokenizer: Any) -> GrammarCache:
    """The process-wide grammar cache of ``tokenizer`` (one per loaded tokenizer)."""
    with _caches_lock:
        cache = _caches.get(id(tokenizer))
        if cache is None or cache.vocab_size != len(tokenizer):
            cache = _caches[id(tokenizer)] = GrammarCache(tokenizer)
        return cache


class GrammarProcessor:
    """Masks every token the grammar does not allow next (one instance per sequence).

    Follows transformers' ``LogitsProcessor`` call signature. Each call first advances the
    matcher by the tokens appended to ``input_ids`` since the previous call (the first
    call only records the prompt length), then sets the logits of disallowed tokens to
    -inf. :meth:`complete` tells the engine when the grammar admits nothing more, so the
    sequence can end there instead of waiting for the model to pick EOS.
    """

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import llguidance.torch as llt
        import torch  # here, not at import: the vLLM adapter imports this module without torch

        self._matcher = matcher
        self._seen: Optional[int] = None
        self._mask = llt.allocate_token_bitmask(1, vocab_size)
        self._fill = llt.fill_next_token_bitmask
        self._bits = torch.arange(32, dtype=torch.int32)
        self._torch = torch

    def _sync(self, input_ids: Any) -> None:
        length = int(input_ids.shape[-1])
        if self._seen is None:
            self._seen = length
            return
        row = input_ids.reshape(-1)
        for token in row[self._seen : length].tolist():
            self._matcher.consume_token(int(token))
        self._seen = length

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self._sync(input_ids)
        torch = self._torch
        if self._matcher.is_stopped() or self._matcher.is_error():
            return scores
        self._fill(self._matcher, self._mask, 0)
        allowed = ((self._mask.unsqueeze(-1) >> self._bits) & 1).reshape(1, -1).bool()
        vocab = scores.shape[-1]
        if allowed.shape[-1] < vocab:  # model rows wider than the tokenizer: padding ids
            pad = torch.zeros((1, vocab - allowed.shape[-1]), dtype=torch.bool)
            allowed = torch.cat([allowed, pad], dim=-1)
        return scores.masked_fill(~allowed[:, :vocab], float("-inf"))

    def accept(self, token: int) -> bool:
        """Advance by a sampled token now (the next call then skips it); returns :meth:`complete`.

        Lets the engine end the sequence the moment the grammar is complete instead of
        computing one more step.
        """
        if self._seen is not None:
            self._matcher.consume_token(int(token))
            self._seen += 1
        return self.complete()

    def complete(self) -> bool:
        """Whether the output so far is a whole match the grammar cannot extend."""
        return bool(self._matcher.is_stopped())

    def accepting(self) -> bool:
        """Whether the output so far is a whole match (it might still be extended)."""
        return bool(self._matcher.is_accepting())

"""Which request fields each API defines that Troupe accepts and ignores on purpose.

Never silently drop meaning: a field an API defines either takes effect, is listed in
:data:`IGNORED` with the reason it changes nothing a caller could notice here, or is a
400 naming it (:data:`UNSUPPORTED`). Fields no API defines are accepted and logged (clients
send new ones); README.md shows these lists.
"""

from __future__ import annotations

from typing import Iterable

from serve_app.errors import InvalidRequest

__all__ = ["IGNORED", "UNSUPPORTED", "check_fields"]

_NO_STORE = "Troupe stores no completions; the usage ledger records every request anyway"
_ABUSE_ID = "an end-user id for a provider's abuse monitoring; Troupe identifies callers by key"
_CACHE = "how long OpenAI keeps a prompt cache; local engines keep theirs in a bounded LRU"

#: Route -> field -> why it is accepted and ignored.
IGNORED: dict[str, dict[str, str]] = {
    "/v1/chat/completions": {
        "user": _ABUSE_ID,
        "safety_identifier": _ABUSE_ID,
        "store": _NO_STORE,
        "metadata": _NO_STORE,
        "prompt_cache_retention": _CACHE,
        "reasoning_effort": "these models do not reason in hidden tokens: no effort to set",
    },
    "/v1/completions": {"user": _ABUSE_ID},
    "/v1/responses": {
        "user": _ABUSE_ID,
        "safety_identifier": _ABUSE_ID,
        "store": "nothing is stored here; the response says store: false",
        "metadata": _NO_STORE,
        "prompt_cache_retention": _CACHE,
        "truncation": "'disabled' is the only behaviour: an over-long input is a 400",
        "reasoning": "these models do not reason in hidden tokens: no effort or summary to set",
    },
    "/v1/messages": {
        "metadata": "Anthropic's user id for abuse monitoring; Troupe identifies callers by key",
        "top_k": "accepted for compatibility; no local engine exposes top-k sampling",
    },
    "/v1beta/models/{model}:generateContent": {
        "safetySettings": "Troupe applies no content filter of its own, so there is no "
                          "threshold to set; the models' own training is what it is",
        "labels": "Vertex AI's billing labels; Troupe's ledger identifies callers by key",
    },
}

_AUDIO = "text models here produce text only; omit it"

#: Route -> field -> why it is refused (the 400 says this).
UNSUPPORTED: dict[str, dict[str, str]] = {
    "/v1/chat/completions": {
        "audio": _AUDIO,
        "modalities": _AUDIO,
        "prediction": "predicted outputs are not supported; omit 'prediction'",
        "web_search_options": "no web search here; omit it",
        "functions": "the legacy 'functions' field is not supported; send 'tools'",
        "function_call": "the legacy 'function_call' field is not supported; send 'tool_choice'",
        "verbosity": "output verbosity control is not supported; omit it",
    },
    "/v1/completions": {},
    "/v1/responses": {
        "prompt": "stored prompt templates are not supported; send 'input'",
        "max_tool_calls": "a limit on tool calls is not enforced here; omit it",
    },
    "/v1/messages": {
        "container": "code execution containers are not supported; omit it",
        "mcp_servers": "MCP servers are not supported; define tools instead",
    },
    "/v1beta/models/{model}:generateContent": {
        "cachedContent": "context caches are not stored here; send the contents themselves",
    },
}


def check_fields(route: str, extras: Iterable[str], present: dict[str, object]) -> list[str]:
    """Raise for a defined but unsupported field; return the unknown ones (to log).

    ``present`` maps the request's extra fields to their values, so a field that is
    sent empty (``null``, ``[]``, ``["text"]`` for ``modalities``) changes nothing and passes.
    """
    refused = UNSUPPORTED.get(route, {})
    ignored = IGNORED.get(route, {})
    unknown = []
    for name in extras:
        value = present.get(name)
        if name in refused and value not in (None, [], {}, ["text"], False):
            raise InvalidRequest(f"'{name}' is not supported on {route}: {refused[name]}.",
                                 param=name)
        if name not in refused and name not in ignored:
            unknown.append(name)
    return sorted(unknown)

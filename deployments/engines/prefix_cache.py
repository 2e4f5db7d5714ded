"""Prefix reuse: a bounded LRU of finished sequences' key/value buffers, per replica.

A request whose prompt starts with tokens a recent sequence already ran (a system prompt,
the earlier turns of a conversation) copies that sequence's buffers for the shared
prefix and prefills only the rest. The cache holds at most ``max_tokens`` tokens of
buffers; the least recently used entries go first.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional, Sequence

__all__ = ["PrefixCache", "common_prefix"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PrefixCache:
    """Token-id prefixes -> key/value buffers (objects with ``length`` and ``fork(n)``)."""

    def __init__(self, max_tokens: int, min_tokens: int = 16) -> None:
        self.max_tokens, self.min_tokens = max_tokens, min_tokens
        self._entries: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._tokens = 0
        self.hits = 0
        self.cached_tokens_total = 0

    def lookup(self, ids: Sequence[int]) -> tuple[int, Optional[Any]]:
        """(tokens reused, a private copy of their buffers) for a prompt; (0, None) on a miss.

        At least the prompt's last token is always computed (its logits are needed).
        """
        best_len, best_key = 0, None
        for key in self._entries:
            n = min(common_prefix(key, ids), len(ids) - 1)
            if n > best_len:
                best_len, best_key = n, key
        if best_key is None or best_len < self.min_tokens:
            return 0, None
        self._entries.move_to_end(best_key)
        self.hits += 1
        self.cached_tokens_total += best_len
        return best_len, self._entries[best_key].fork(best_len)

    def store(self, ids: Sequence[int], kv: Any) -> None:
        """Keep a finished sequence's buffers (``ids``: the tokens they hold)."""
        key = tuple(ids[: kv.length])
        if len(key) < self.min_tokens or len(key) > self.max_tokens:
            return
        if key in self._entries:
            self._entries.move_to_end(key)
            return
        self._entries[key] = kv
        self._tokens += len(key)
        while self._tokens > self.max_tokens:
            old, _ = self._entries.popitem(last=False)
            self._tokens -= len(old)

    def __len__(self) -> int:
        return len(self._entries)

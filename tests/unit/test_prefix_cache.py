"""Prefix reuse: the LRU of key/value buffers, and a second turn prefilled from it."""

from __future__ import annotations

import pytest
import torch

from deployments.engines.prefix_cache import PrefixCache, common_prefix
from serve_app.protocol.internal import TextChunk

pytest.importorskip("transformers")

from deployments.engines.ragged import RaggedModel  # noqa: E402
from tests.unit.test_ragged import tiny_llama  # noqa: E402


class Buf:
    def __init__(self, n):
        self.length = n

    def fork(self, n):
        return Buf(n)


def test_lookup_takes_the_longest_shared_prefix_and_leaves_the_last_token():
    cache = PrefixCache(max_tokens=100, min_tokens=2)
    cache.store(list(range(10)), Buf(10))
    cache.store([0, 1, 2, 9, 9], Buf(5))
    n, kv = cache.lookup(list(range(10)) + [42])
    assert (n, kv.length) == (10, 10)
    n, _ = cache.lookup(list(range(10)))  # the whole prompt cached: its last token is recomputed
    assert n == 9
    assert cache.lookup([7, 7, 7]) == (0, None)
    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2


def test_lru_bound_in_tokens():
    cache = PrefixCache(max_tokens=20, min_tokens=2)
    cache.store(list(range(10)), Buf(10))
    cache.store(list(range(100, 110)), Buf(10))
    cache.lookup(list(range(10)) + [1])  # touch the first: the second is now the oldest
    cache.store(list(range(200, 210)), Buf(10))
    assert len(cache) == 2
    assert cache.lookup(list(range(100, 110)) + [1]) == (0, None)
    assert cache.lookup(list(range(10)) + [1])[0] == 10


def test_second_turn_prefills_only_the_new_tokens():
    stepper = RaggedModel(tiny_llama())
    cache = PrefixCache(max_tokens=1000, min_tokens=4)
    first_turn = [5, 6, 7, 8, 9, 10, 11, 12]
    kv = stepper.new_kv()
    token = int(stepper.prefill(kv, first_turn).argmax())
    answer = [token]
    for _ in range(3):
        answer.append(int(stepper.decode([kv], [answer[-1]])[0].argmax()))
    cache.store(first_turn + answer, kv)  # kv holds first_turn + answer[:-1]
    second_turn = first_turn + answer + [30, 31, 32]
    cached, fork = cache.lookup(second_turn)
    assert cached == len(first_turn) + 3
    from_cache = stepper.prefill(fork, second_turn[cached:])
    from_scratch = stepper.prefill(stepper.new_kv(), second_turn)
    assert torch.allclose(from_cache, from_scratch, atol=1e-4)
    assert kv.length == len(first_turn) + 3  # the cached entry itself is untouched


def test_usage_reports_cached_prompt_tokens():
    final = TextChunk("", 1, "stop", prompt_tokens=40, completion_tokens=5, cached_tokens=32)
    assert final.usage()["prompt_tokens_details"] == {"cached_tokens": 32}
    assert "prompt_tokens_details" not in TextChunk("", 1, "stop", 40, 5).usage()

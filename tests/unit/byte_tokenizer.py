"""A tiny real tokenizer for engine unit tests: one token per byte plus ``<eos>`` (id 0).

Byte-level like the bundled SmolLM2's, so the grammar library treats it the same way, but
built in memory in milliseconds (no model files).
"""

from __future__ import annotations

from typing import Any


def byte_tokenizer(chat_template: str = "") -> Any:
    """A ``PreTrainedTokenizerFast`` with 257 tokens; ``chat_template`` set when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<eos>": 0, **{c: i + 1 for i, c in enumerate(bytes_to_unicode().values())}}
    inner = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=inner, eos_token="<eos>")
    if chat_template:
        tok.chat_template = chat_template
    return tok


def ids_of(tok: Any, text: str) -> list[int]:
    """Token ids of ``text`` (one per byte)."""
    return tok.encode(text, add_special_tokens=False)

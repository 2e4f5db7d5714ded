"""How many tokens one streamed chunk of the vLLM adapter carries (``stream_interval``).

Every chunk a model replica yields becomes one Serve streaming item: one Ray object on
the replica, one on the gateway, one SSE event through the HTTP proxy. On a 2-core CPU
server with 16 streams, those hops cost Troupe about 2.6 ms of CPU per token in three
processes (``bench/vllm_cpu_bench.py``, per-process CPU at c=16), CPU that vLLM's engine
core then lacks; ``vllm serve`` spends about 0.2 ms. vLLM itself offers the remedy as a
per-request ``SamplingParams.stream_interval``: its output processor sends the first token
at once, then a chunk every ``n`` tokens, and the last one when the request finishes,
with text, token ids and logprobs merged in order. So nothing a client reads changes but
the grouping, and the time to first token not at all.

``auto`` pays that grouping only under load: a lone stream still gets every token as it
is made, and each chunk grows by one token per 4 streams already running (4 tokens per
chunk at 16 streams, where one engine step of the bundled model takes ~70 ms on this CPU).
"""

from __future__ import annotations

from typing import Any, Literal, Union

__all__ = ["stream_interval", "without_unknown_stream_interval", "AUTO_STREAMS_PER_TOKEN",
           "AUTO_MAX_INTERVAL"]

#: ``auto``: one more token per chunk for every this many streams already running.
AUTO_STREAMS_PER_TOKEN = 4
#: ``auto``: the largest chunk (tokens) it asks for.
AUTO_MAX_INTERVAL = 8


def stream_interval(setting: Union[Literal["auto"], int], running: int) -> int:
    """Tokens per chunk for a request admitted while ``running`` others stream."""
    if setting != "auto":
        return int(setting)
    return min(AUTO_MAX_INTERVAL, 1 + max(0, running) // AUTO_STREAMS_PER_TOKEN)


def without_unknown_stream_interval(kwargs: dict[str, Any], params_type: Any) -> dict[str, Any]:
    """``kwargs`` less ``stream_interval`` when this vLLM's ``SamplingParams`` predates it
    (vLLM < 0.11 streams every token; the grouping is only ever a saving)."""
    fields = getattr(params_type, "__struct_fields__", None)
    if "stream_interval" in kwargs and fields is not None and "stream_interval" not in fields:
        kwargs = dict(kwargs)
        del kwargs["stream_interval"]
    return kwargs

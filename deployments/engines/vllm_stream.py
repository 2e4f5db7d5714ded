"""How many tokens one streamed chunk of the vLLM adapter carries (``stream_interval``).

Every chunk a model replica yields becomes one Serve streaming item: one Ray object on
the replica, one on the gateway, one SSE event through the HTTP proxy. On a 2-core CPU
server with 16 streams, those hops cost Troupe about 2.7 ms of CPU per token in three
processes (``bench/vllm_cpu_profile.py`` at c=16), CPU that vLLM's engine
core then lacks; ``vllm serve`` spends about 0.2 ms. vLLM itself offers the remedy as a
per-request ``SamplingParams.stream_interval``: its output processor sends the first token
at once, then a chunk every ``n`` tokens, and the last one when the request finishes,
with text, token ids and logprobs merged in order. So nothing a client reads changes but
the grouping, and the time to first token not at all.

``auto`` pays that grouping only under load: a lone stream still gets every token as it
is made, and each chunk grows by one token per 4 streams running (4 tokens per chunk at 16
streams, where one engine step of the bundled model takes ~70 ms on this CPU). "Running"
is the most streams seen at once in the last :data:`LOAD_WINDOW_S` seconds, not the count
at admission: requests of equal length started together end together, so the next wave
is admitted while few streams run, and counted at admission it streamed at 2 tokens per
chunk where 16 streams ran (``bench/results/20261203T204119Z-vllm-cpu.md``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Literal, Union

__all__ = ["stream_interval", "without_unknown_stream_interval", "RecentPeak",
           "AUTO_STREAMS_PER_TOKEN", "AUTO_MAX_INTERVAL", "LOAD_WINDOW_S"]

#: ``auto``: one more token per chunk for every this many streams already running.
AUTO_STREAMS_PER_TOKEN = 4
#: ``auto``: the largest chunk (tokens) it asks for.
AUTO_MAX_INTERVAL = 8
#: How long a peak of running streams keeps counting after the load falls.
LOAD_WINDOW_S = 10.0


class RecentPeak:
    """The most streams seen running at once in about the last ``window_s`` seconds."""

    def __init__(self, window_s: float = LOAD_WINDOW_S, clock: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._clock = clock
        self.peak = 0
        self._at = clock()

    def update(self, running: int) -> int:
        """Note ``running`` streams now; returns the recent peak."""
        now = self._clock()
        if running >= self.peak or now - self._at > self.window_s:
            self.peak, self._at = running, now
        return self.peak


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

"""Remote provider engines: Troupe's text (and embeddings) engines over a provider's HTTP
API, and the transport they share.

=====================  ==============================================================
``engine.py``          :class:`RemoteEngine`: lifecycle, the streamed and the unary call,
                       the hooks a provider fills in (request, SSE event, JSON answer,
                       error classification)
``retry.py``           the one retry loop both calls use: credentials (one refresh after
                       a 401), circuit breaker, backoff with full jitter, ``Retry-After``
``transport.py``       one attempt over HTTP: send, phase deadlines, abort
``stream.py``          one 200 answer (SSE events or whole JSON) -> outputs, final usage
``errors.py``          the table of provider HTTP statuses -> Troupe errors, and the
                       transport's own failures (timeouts, unreachable, not JSON)
``breaker.py``         the circuit breaker and this process's registry of them
``sse.py``             incremental Server-Sent Events parsing
``upstream_util.py``   pure helpers: retryable statuses, ``Retry-After``, backoff, trimming
                       and scrubbing the key out of provider text
``openai.py``          OpenAI-compatible chat completions and embeddings (also Azure's URL
                       shape)
``anthropic.py``       Anthropic's Messages API
``gemini.py``          Google's Gemini API (generate and embed)
``embeddings.py``      the embeddings engine over a provider's text engine
=====================  ==============================================================

A new provider is one module here with a :class:`RemoteEngine` subclass (its wire format
and, when its errors say more than their status, ``classify_error``), one line in the
text engine registry (``deployments/engines/base.py``; ``modality_base.py`` too if it
embeds), and its config class in the settings.
"""

from deployments.engines.remote.breaker import CircuitBreaker
from deployments.engines.remote.engine import RemoteEngine, StreamState
from deployments.engines.remote.errors import UpstreamFailure
from deployments.engines.remote.sse import SSEParser
from deployments.engines.remote.transport import UpstreamCall
from deployments.engines.remote.upstream_util import backoff_delay, retry_after_seconds

__all__ = [
    "RemoteEngine",
    "UpstreamFailure",
    "CircuitBreaker",
    "SSEParser",
    "StreamState",
    "UpstreamCall",
    "retry_after_seconds",
    "backoff_delay",
]

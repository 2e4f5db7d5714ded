"""A text engine over a remote OpenAI-compatible chat completions API (OpenAI, Azure OpenAI).

The transport (credentials, phase timeouts, retries, circuit breaker, error mapping)
is :mod:`deployments.engines.remote`; this module only speaks OpenAI's wire format.

URL shapes: OpenAI ``POST {base_url}/chat/completions`` with ``Authorization: Bearer``;
Azure OpenAI (``azure_deployment`` set) ``POST {base_url}/openai/deployments/{name}/chat/
completions?api-version=…`` with an ``api-key`` header (the deployment names the model).

Every request streams upstream (``stream: true`` with ``stream_options.include_usage``)
so the gateway can stream too *and* the final output carries the provider's exact usage,
which is what cost is computed from:

* each SSE chunk with delta content becomes one :class:`EngineOutput` with
  ``num_tokens=1`` (an approximation: providers send about one token per chunk) and
  ``prompt_tokens=0`` (unknown until the usage chunk);
* the final output (``text=""``) carries ``finish_reason``, the exact
  ``usage.prompt_tokens``, and ``num_tokens = usage.completion_tokens - already reported``,
  so the sum of ``num_tokens`` over the stream equals the provider's completion tokens.
  When the provider reported fewer tokens than chunks it sent, the correction is clamped
  at 0. When the provider sends no usage at all, the chunk approximation stands and
  ``prompt_tokens`` stays 0.

A client's ``prompt_cache_key`` (the gateway's session key) goes upstream unchanged where
the configuration allows (``OpenAIEngineConfig.sends_prompt_cache_key``).

A server that ignores ``stream`` and answers one JSON ``chat.completion`` is accepted
too (:meth:`OpenAITextEngine.on_json`).

The agent fields (tools, tool turns, images, response formats, logprobs, penalties, logit
bias) are translated by :mod:`.openai_wire`; a chunk with ``delta.tool_calls`` or
``logprobs`` is an output carrying them. Finish reasons map ``stop`` to ``stop``,
``tool_calls``/``function_call`` to ``tool_calls`` and ``length`` to ``length``;
``content_filter`` raises CONTENT_FILTERED (an error event when the stream
had started). Errors map by status and by the provider's machine-readable ``error.code``
/ ``error.type``, never by message text.
"""

from __future__ import annotations

from typing import Any, Optional
from urllib.parse import quote

from deployments.engines.remote.engine import RemoteEngine, StreamState
from deployments.engines.remote.openai_wire import (
    build_chat_body,
    read_usage,
    token_logprobs,
    tool_call_deltas,
)
from deployments.engines.remote.sse import SSEParser
from deployments.engines.remote.transport import UpstreamCall
from serve_app.errors import InferenceFailed, TroupeError
from serve_app.protocol.internal import EngineFinishReason, EngineOutput, GenerationRequest
from serve_app.settings import OpenAIEngineConfig

__all__ = ["OpenAITextEngine", "SSEParser", "build_chat_body", "build_embeddings_body"]

_FINISH: dict[str, EngineFinishReason] = {"stop": "stop", "length": "length",
                                          "tool_calls": "tool_calls", "function_call": "tool_calls"}
_CONTENT_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})


def build_embeddings_body(model: str, texts: list[str]) -> dict[str, Any]:
    return {"model": model, "input": list(texts), "encoding_format": "float"}


class OpenAITextEngine(RemoteEngine):
    """See the module docstring."""

    def __init__(self, model_id: str, config: OpenAIEngineConfig) -> None:
        super().__init__(model_id, config)
        self.provider = config.provider
        base = config.base_url.rstrip("/")
        if config.azure_deployment:
            prefix = f"{base}/openai/deployments/{quote(config.azure_deployment, safe='')}"
            query = f"?api-version={quote(config.api_version, safe='')}"
            self._url = f"{prefix}/chat/completions{query}"
            self._embeddings_url = f"{prefix}/embeddings{query}"
        else:
            self._url = base + "/chat/completions"
            self._embeddings_url = base + "/embeddings"

    def _headers(self, secret: str) -> dict[str, str]:
        if self.config.azure_deployment:
            headers = {"api-key": secret}
        else:
            headers = {"Authorization": f"Bearer {secret}"}
        headers["Content-Type"] = "application/json"
        if self.config.organization:
            headers["OpenAI-Organization"] = self.config.organization
        return headers

    def build_http(self, request: GenerationRequest, secret: str) -> UpstreamCall:
        headers = self._headers(secret)
        headers["Accept"] = "text/event-stream"
        body = build_chat_body(self.config.model, request, self.context_length)
        if self.config.azure_deployment:
            body.pop("model")  # the deployment names the model
        if request.session_key and self.config.sends_prompt_cache_key:
            # The provider routes requests sharing it to one prompt cache, as the gateway
            # does for its own replicas.
            body["prompt_cache_key"] = request.session_key
        return UpstreamCall(self._url, headers, body)

    # ------------------------------------------------------------------ responses

    def on_event(self, data: str, state: StreamState) -> Optional[EngineOutput]:
        if data.strip() == "[DONE]":
            state.done = True
            return None
        event = self.event_json(data)
        if event is None:
            return None
        if event.get("error") is not None:
            raise self.mid_stream_error(event["error"])
        usage = event.get("usage")
        if isinstance(usage, dict):
            read_usage(usage, state)
        text, calls, logprobs = "", None, None
        for choice in event.get("choices") or ():
            delta = choice.get("delta") or {}
            text += delta.get("content") or ""
            calls = tool_call_deltas(delta.get("tool_calls")) or calls
            logprobs = token_logprobs(choice.get("logprobs")) or logprobs
            self._finish(choice.get("finish_reason"), state)
        if not text and not calls:
            return None
        state.reported += 1
        return EngineOutput(text, 1, state.prompt_tokens, logprobs=logprobs, tool_calls=calls)

    def on_json(self, body: Any, state: StreamState) -> list[EngineOutput]:
        if not isinstance(body, dict) or not isinstance(body.get("choices"), list):
            raise InferenceFailed(
                f"The upstream provider of model '{self.model_id}' sent an answer without "
                "choices.", details={"provider": self.provider})
        read_usage(body.get("usage") or {}, state)
        text, calls, logprobs = "", None, None
        for choice in body["choices"][:1]:
            message = choice.get("message") or {}
            text = message.get("content") or ""
            calls = tool_call_deltas(message.get("tool_calls"))
            logprobs = token_logprobs(choice.get("logprobs"))
            self._finish(choice.get("finish_reason") or "stop", state)
        if not text and not calls:
            return []
        state.reported += 1
        return [EngineOutput(text, 1, state.prompt_tokens, logprobs=logprobs, tool_calls=calls)]

    def _finish(self, reason: Optional[str], state: StreamState) -> None:
        if not reason:
            return
        if reason == "content_filter":
            raise self.content_error("the answer was stopped (finish_reason content_filter)")
        state.finish_reason = _FINISH.get(reason, "stop")

    def classify_error(
        self, status: int, error: dict[str, Any], headers: Any
    ) -> Optional[TroupeError]:
        code = error.get("code")
        etype = error.get("type")
        message = str(error.get("message") or f"HTTP {status}")
        if code == "context_length_exceeded":
            return self.context_error(message, error.get("param") or "messages")
        if code in _CONTENT_FILTER_CODES or (isinstance(error.get("innererror"), dict)
                                             and error["innererror"].get("code")
                                             == "ResponsibleAIPolicyViolation"):
            return self.content_error(message)
        if code == "insufficient_quota" or etype == "insufficient_quota":
            return self.quota_error(message)
        return None

    # ------------------------------------------------------------------ embeddings

    async def embed(self, texts: list[str]) -> tuple[list[list[float]], int]:
        """Embed ``texts`` (OpenAI ``/embeddings``); returns vectors and prompt tokens."""
        body = build_embeddings_body(self.config.model, texts)
        if self.config.azure_deployment:
            body.pop("model")
        data = await self.unary_json(self._embeddings_url, self._headers, body)
        items = sorted(data.get("data") or [], key=lambda d: d.get("index", 0))
        vectors = [list(map(float, item["embedding"])) for item in items]
        usage = data.get("usage") or {}
        return vectors, int(usage.get("prompt_tokens") or 0)

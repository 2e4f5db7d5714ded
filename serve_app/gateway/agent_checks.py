"""Refuse agent fields an engine's provider cannot honour, so no meaning is dropped.

Local engines (mock, transformers, vLLM) take the whole internal vocabulary. The remote
provider engines translate tools, tool turns, images and structured output for every
provider; what a provider's API has no way to say is a 400 naming the field and the
provider (the one place this is decided):

==========  ===================================================================
provider    refused
==========  ===================================================================
openai      ``prompt`` as token ids (chat completions take text turns); ``echo`` with
            ``logprobs`` (no provider returns the prompt tokens' logprobs)
azure       as openai
anthropic   ``logprobs``, ``echo`` with ``logprobs``, ``presence_penalty``, ``frequency_penalty``,
            ``logit_bias``, token-id ``prompt``; ``response_format`` together with
            ``tools`` (structured output is a forced tool there), and a JSON schema
            whose root is not an object (a tool's input is an object)
gemini      ``logit_bias``, token-id ``prompt``, ``echo`` with ``logprobs``,
            ``parallel_tool_calls: false``
            (Gemini has no switch for it)
==========  ===================================================================
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import GenerationRequest

__all__ = ["unsupported_field", "refuse_unsupported", "PROVIDER_LIMITS"]

_Check = Callable[[GenerationRequest], bool]


def _logprobs(r: GenerationRequest) -> bool:
    return r.sampling.logprobs is not None


def _presence(r: GenerationRequest) -> bool:
    return r.sampling.presence_penalty != 0.0


def _frequency(r: GenerationRequest) -> bool:
    return r.sampling.frequency_penalty != 0.0


def _logit_bias(r: GenerationRequest) -> bool:
    return bool(r.sampling.logit_bias)


def _token_prompt(r: GenerationRequest) -> bool:
    return r.prompt_token_ids is not None


def _prompt_logprobs(r: GenerationRequest) -> bool:
    return r.sampling.prompt_logprobs is not None


def _format_not_a_tool(r: GenerationRequest) -> bool:
    rf = r.response_format
    if rf is None or rf.type == "text":
        return False
    non_object = rf.type == "json_schema" and (rf.schema or {}).get("type", "object") != "object"
    return bool(r.tools) or non_object


def _serial_tools(r: GenerationRequest) -> bool:
    return bool(r.tools) and not r.parallel_tool_calls


#: provider -> (field, whether the request uses it in a way the provider cannot carry).
PROVIDER_LIMITS: dict[str, list[tuple[str, _Check]]] = {
    "openai": [("prompt", _token_prompt), ("echo", _prompt_logprobs)],
    "azure": [("prompt", _token_prompt), ("echo", _prompt_logprobs)],
    "anthropic": [("logprobs", _logprobs), ("echo", _prompt_logprobs), ("presence_penalty", _presence),
                  ("frequency_penalty", _frequency), ("logit_bias", _logit_bias),
                  ("prompt", _token_prompt), ("response_format", _format_not_a_tool)],
    "gemini": [("logit_bias", _logit_bias), ("prompt", _token_prompt), ("echo", _prompt_logprobs),
               ("parallel_tool_calls", _serial_tools)],
}

#: What a remote provider without a translator of its own could not carry (text only).
_TEXT_ONLY: list[tuple[str, _Check]] = [
    ("tools", lambda r: bool(r.tools)),
    ("response_format", lambda r: r.response_format is not None),
    ("logprobs", _logprobs), ("presence_penalty", _presence),
    ("frequency_penalty", _frequency), ("logit_bias", _logit_bias),
    ("prompt", _token_prompt), ("echo", _prompt_logprobs),
]


def unsupported_field(request: GenerationRequest, turns: str = "messages",
                      provider: str = "") -> Optional[str]:
    """The first field of ``request`` that ``provider`` cannot carry (None: all fit).

    A provider not in :data:`PROVIDER_LIMITS` is treated as text and sampling only, its
    tool and image turns named by ``turns`` (the field that carries them)."""
    checks = PROVIDER_LIMITS.get(provider)
    if checks is None:
        checks = _TEXT_ONLY + [(turns, lambda r: any(
            m.tool_calls or m.tool_call_id or m.parts for m in r.messages or ()))]
    return next((name for name, used in checks if used(request)), None)


def refuse_unsupported(model: Any, request: GenerationRequest, turns: str = "messages") -> None:
    """A 400 when ``model`` runs on a remote provider that cannot carry a field of ``request``."""
    provider = model.engine.provider
    if provider == "local":
        return
    field = unsupported_field(request, turns, provider)
    if field is not None:
        raise InvalidRequest(
            f"Model {model.id!r} is served by the {provider} provider, whose API cannot "
            f"carry '{field}' as sent; use a model on another provider (or a local one), "
            "or drop the field.",
            param=field,
            details={"provider": provider, "field": field},
        )

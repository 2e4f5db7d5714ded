"""Refuse agent fields an engine cannot honour, so no meaning is dropped on the way.

Local engines (mock, transformers, vLLM) take the whole internal vocabulary. The remote
provider adapters forward text turns and sampling only (carrying tools and formats to the
providers is the remote-provider issue's work), so a request that needs more gets a 400
naming the field instead of an answer that silently ignored it.
"""

from __future__ import annotations

from typing import Any, Optional

from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import GenerationRequest

__all__ = ["unsupported_field", "refuse_unsupported"]


def unsupported_field(request: GenerationRequest, turns: str = "messages") -> Optional[str]:
    """The first agent field of ``request`` a text-and-sampling-only engine would drop."""
    sp = request.sampling
    checks = [
        ("tools", bool(request.tools)),
        ("response_format", request.response_format is not None),
        ("logprobs", sp.logprobs is not None),
        ("presence_penalty", sp.presence_penalty != 0.0),
        ("frequency_penalty", sp.frequency_penalty != 0.0),
        ("logit_bias", bool(sp.logit_bias)),
        ("prompt", request.prompt_token_ids is not None),
        (turns, any(m.tool_calls or m.tool_call_id or m.parts for m in request.messages or ())),
    ]
    return next((name for name, used in checks if used), None)


def refuse_unsupported(model: Any, request: GenerationRequest, turns: str = "messages") -> None:
    """A 400 when ``model`` runs on a remote provider and ``request`` uses agent fields."""
    if model.engine.provider == "local":
        return
    field = unsupported_field(request, turns)
    if field is not None:
        raise InvalidRequest(
            f"Model {model.id!r} is served by the {model.engine.provider} provider adapter, "
            f"which does not carry '{field}' (tools, formats, logprobs, penalties, token ids "
            "and tool or image turns) yet; use a local model or drop the field.",
            param=field,
        )

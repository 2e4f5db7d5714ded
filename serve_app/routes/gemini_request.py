"""The checks and translation every Gemini text call makes (generate, stream, countTokens).

Separate from :mod:`serve_app.routes.gemini_api` so the route module stays a thin list of
routes; the field-by-field translation itself is :mod:`serve_app.protocol.gemini_translate`.
"""

from __future__ import annotations

from serve_app.errors import InvalidRequest
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.deadline import apply_start_within
from serve_app.gateway.images import admit_images
from serve_app.protocol.field_policy import check_fields
from serve_app.protocol.gemini import GenerateContentRequest, GenerationConfig
from serve_app.protocol.gemini_translate import (
    check_generation_config,
    internal_messages,
    logprobs_of,
    response_format_of,
    tool_choice_of,
    tool_specs,
)
from serve_app.protocol.internal import GenerationRequest
from serve_app.settings import ModelConfig

__all__ = ["POLICY_ROUTE", "generate_request", "gemini_top"]

#: The field policy's name for Gemini's generate routes (see field_policy.py).
POLICY_ROUTE = "/v1beta/models/{model}:generateContent"


def gemini_top(body: GenerateContentRequest) -> int:
    """Alternatives per token asked for in ``logprobsResult.topCandidates``."""
    config = body.generation_config
    return (config.logprobs or 0) if config is not None and config.response_logprobs else 0


def _tiers(model: ModelConfig, gen: GenerationRequest, body: GenerateContentRequest) -> None:
    """``start_within`` / ``service_tier`` as on the other shapes; Gemini has no ``auto``."""
    for name in ("start_within", "service_tier"):
        if getattr(body, name) == "auto":
            raise InvalidRequest(f"{name} 'auto' does not exist in Gemini's shape: use "
                                 "'default', 'priority' or a start_within duration.", param=name)
    if body.start_within is not None or body.service_tier is not None:
        apply_start_within(model, gen, body.start_within, body.service_tier)


async def generate_request(
    core: GatewayCore, model_id: str, body: GenerateContentRequest, request_id: str,
    route: str,
) -> tuple[GenerationRequest, int]:
    """The internal request and the number of candidates (``candidateCount``)."""
    extras = sorted((body.model_extra or {}).keys())
    core.note_unknown_fields(route, check_fields(POLICY_ROUTE, extras, body.model_extra or {}))
    if body.model is not None and body.model.removeprefix("models/") != model_id:
        raise InvalidRequest(f"'model' {body.model!r} differs from the model in the URL "
                             f"({model_id!r}).", param="model")
    model = core.resolve(model_id)
    config = body.generation_config or GenerationConfig()
    check_generation_config(config)
    gen = core.build_request(
        request_id, max_tokens=config.max_output_tokens, temperature=config.temperature,
        top_p=config.top_p, seed=config.seed, stop=tuple(config.stop_sequences or ()))
    gen.sampling.presence_penalty = config.presence_penalty or 0.0
    gen.sampling.frequency_penalty = config.frequency_penalty or 0.0
    gen.sampling.logprobs = logprobs_of(config)
    gen.messages = internal_messages(body.system_instruction, body.contents)
    gen.tool_choice, gen.tools = tool_choice_of(body.tool_config, tool_specs(body.tools))
    gen.response_format = response_format_of(config)
    _tiers(model, gen, body)
    await admit_images(core, model, gen, param="contents")
    return gen, config.candidate_count or 1

"""What the vLLM adapter adds for agents: structured outputs, forced tool calls, logprobs,
penalties and logit bias in vLLM's ``SamplingParams``, and vLLM's logprobs back in
Troupe's vocabulary.

The constraint is the same one the CPU engine enforces itself
(:func:`deployments.engines.constraints.constraint_schema`): vLLM gets it as
``structured_outputs=StructuredOutputsParams(json=...)`` (vLLM >= 0.10.2; older releases
take ``guided_decoding=GuidedDecodingParams(json=...)``), so both engines answer the same
request the same way. Tool calls in auto mode are read from the text by Troupe's own
parsers (vLLM's tool parsers live in its HTTP server, not in ``AsyncLLM``).
"""

from __future__ import annotations

import math
from typing import Any, Optional

from deployments.engines.constraints import constraint_schema, grammar_cache_for
from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import MAX_TOP_LOGPROBS, GenerationRequest, TokenLogprob

__all__ = ["agent_sampling_kwargs", "vocab_size_of", "shape_delta", "to_vllm_structured",
           "token_logprobs_from_vllm", "vllm_request_errors", "template_errors",
           "STRUCTURED_ENGINE_DEFAULTS", "to_vllm_engine_args"]

#: The key ``build_sampling_kwargs`` uses; the default factory turns it into vLLM's type.
STRUCTURED_KEY = "structured_outputs"

#: vLLM's engine-wide ``structured_outputs_config`` unless ``extra_engine_args`` sets one:
#: llguidance (the library the CPU engine compiles with, so both engines accept the same
#: schemas) and compact JSON. With vLLM's default, whitespace between JSON tokens, the
#: bundled SmolLM2 on vLLM's CPU build filled max_tokens with newlines inside a valid-so-far
#: object: an answer that does not parse.
STRUCTURED_ENGINE_DEFAULTS = {"backend": "guidance", "disable_any_whitespace": True}


def to_vllm_engine_args(engine_args: dict[str, Any]) -> dict[str, Any]:
    """``engine_args`` with a plain ``structured_outputs_config`` dict as vLLM's own config
    (``AsyncEngineArgs`` takes the object, not a dict)."""
    spec = engine_args.get("structured_outputs_config")
    if isinstance(spec, dict):
        from vllm.config import StructuredOutputsConfig

        engine_args = {**engine_args, "structured_outputs_config": StructuredOutputsConfig(**spec)}
    return engine_args


def agent_sampling_kwargs(request: GenerationRequest, tokenizer: Any = None) -> dict[str, Any]:
    """The ``SamplingParams`` keywords for logprobs, penalties, logit bias and constraints.

    The constraint goes in as a plain dict under ``structured_outputs`` (``{"json": schema}``
    or ``{"json_object": True}``), turned into vLLM's params type by the factory. With a
    Hugging Face ``tokenizer`` the schema is first compiled by the CPU engine's grammar
    cache, so a keyword no backend can enforce is a 400 naming it (vLLM would refuse it
    at submission with an error that does not say which field).

    Raises:
        InvalidRequest: a bad ``logit_bias`` or ``top_logprobs``, a bad tool choice, or
            ``echo`` with logprobs (prompt logprobs are not wired to vLLM's).
    """
    sp = request.sampling
    kwargs: dict[str, Any] = {}
    if sp.prompt_logprobs is not None:
        raise InvalidRequest("echo with logprobs (the prompt tokens' logprobs) is not supported on the "
                             "vLLM engine; send echo without logprobs, or logprobs without echo.", param="echo")
    if sp.logprobs is not None:
        if not 0 <= sp.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}.", param="top_logprobs")
        kwargs["logprobs"] = sp.logprobs
    if sp.presence_penalty:
        kwargs["presence_penalty"] = sp.presence_penalty
    if sp.frequency_penalty:
        kwargs["frequency_penalty"] = sp.frequency_penalty
    if sp.logit_bias:
        from deployments.engines.logits import check_logit_bias  # torch: only when needed

        vocab_size = vocab_size_of(tokenizer)
        kwargs["logit_bias"] = (
            check_logit_bias(sp.logit_bias, vocab_size) if vocab_size else dict(sp.logit_bias)
        )
    schema, param = constraint_schema(request)
    if schema is not None:
        if hasattr(tokenizer, "get_vocab") and vocab_size_of(tokenizer):
            grammar_cache_for(tokenizer).matcher(schema, param)
        fmt = request.response_format
        plain_object = fmt is not None and fmt.type == "json_object" and schema == {"type": "object"}
        kwargs[STRUCTURED_KEY] = {"json_object": True} if plain_object else {"json": schema}
    return kwargs


def to_vllm_structured(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Replace the plain ``structured_outputs`` dict by vLLM's own params object."""
    spec = kwargs.pop(STRUCTURED_KEY, None)
    if spec is None:
        return kwargs
    try:
        from vllm.sampling_params import StructuredOutputsParams

        kwargs[STRUCTURED_KEY] = StructuredOutputsParams(**spec)
    except ImportError:  # vLLM before 0.10.2
        from vllm.sampling_params import GuidedDecodingParams

        kwargs["guided_decoding"] = GuidedDecodingParams(**spec)
    return kwargs


def token_logprobs_from_vllm(
    token_ids: list[int], logprobs: Optional[list[dict[int, Any]]], top_k: int
) -> Optional[list[TokenLogprob]]:
    """vLLM's per-token ``{token_id: Logprob}`` dicts as :class:`TokenLogprob` entries.

    vLLM puts the sampled token in each dict (with its rank) plus the ``top_k`` best;
    ``decoded_token`` is the token's text.
    """
    if logprobs is None:
        return None
    entries = []
    for token_id, options in zip(token_ids, logprobs):
        ranked = sorted(options.items(), key=lambda kv: getattr(kv[1], "rank", 0) or 0)
        top = tuple(
            (_text(lp, tid), int(tid), _finite(lp.logprob)) for tid, lp in ranked if (lp.rank or 0) >= 1
        )[:top_k]
        chosen = options.get(token_id)
        entries.append(TokenLogprob(
            _text(chosen, token_id) if chosen is not None else str(token_id),
            int(token_id),
            _finite(chosen.logprob) if chosen is not None else -9999.0,
            top,
        ))
    return entries


def _text(logprob: Any, token_id: int) -> str:
    text = getattr(logprob, "decoded_token", None)
    return text if text is not None else str(token_id)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0


def shape_delta(parser: Any, completion: Any, top_k: Optional[int], final: bool) -> dict[str, Any]:
    """``EngineOutput`` fields for one vLLM delta: text outside tool calls, the call
    fragments (``parser``: see :func:`deployments.engines.tool_parsers.parser_for`) and
    the logprobs (``top_k`` None: not asked for)."""
    text, deltas = completion.text, []
    if parser is not None:
        text, deltas = parser.feed(text)
        if final:
            tail, more = parser.finish()
            text, deltas = text + tail, deltas + more
    logprobs = None
    if top_k is not None:
        found = getattr(completion, "logprobs", None)
        logprobs = token_logprobs_from_vllm(list(completion.token_ids), found, top_k) or []
    return {"text": text, "tool_calls": deltas or None, "logprobs": logprobs}


def vocab_size_of(tokenizer: Any) -> Optional[int]:
    """The tokenizer's vocabulary size, if it says (logit_bias ids are checked against it)."""
    try:
        return len(tokenizer) if tokenizer is not None else None
    except TypeError:
        return None


def vllm_request_errors() -> tuple[type[BaseException], ...]:
    """Exception types vLLM uses to refuse a request at submission (input validation)."""
    errors: list[type[BaseException]] = [ValueError]
    try:  # newer vLLM: VLLMValidationError is a VLLMClientError, no longer a ValueError
        from vllm.exceptions import VLLMValidationError

        errors.append(VLLMValidationError)
    except ImportError:
        pass
    return tuple(errors)


def template_errors() -> tuple[type[BaseException], ...]:
    """Errors a chat template raises for a conversation it refuses, or a model without one.

    Templates call ``raise_exception`` (a jinja2 TemplateError) for e.g. roles that do not
    alternate; transformers raises ValueError when no template is set. jinja2 comes with
    torch and transformers, but is imported only when an engine starts.
    """
    from jinja2 import TemplateError

    return (TemplateError, ValueError)

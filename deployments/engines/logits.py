"""Per-sequence logits processing shared by the local engines: penalties, logit bias, the
grammar constraint, and logprobs taken from the processed logits.

Every processor follows transformers' ``LogitsProcessor`` call signature,
``proc(input_ids[1, seq_len], scores[1, vocab]) -> scores``, and holds one sequence's
state; :func:`build_logits_processors` makes the list for one request, applied in order
before sampling (``model.generate`` takes it as a ``LogitsProcessorList``; a batched step
loop calls each on its own row).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from deployments.engines.constraints import GrammarProcessor, constraint_schema, grammar_cache_for
from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import MAX_TOP_LOGPROBS, GenerationRequest, TokenLogprob

__all__ = [
    "prompt_token_logprobs",
    "LogitBiasProcessor",
    "PenaltyProcessor",
    "LogprobRecorder",
    "build_logits_processors",
    "grammar_of",
    "token_logprobs",
    "check_logit_bias",
]


def check_logit_bias(bias: dict, vocab_size: int) -> dict[int, float]:
    """``logit_bias`` as {token id: bias}, every id in the vocabulary, every value in [-100, 100].

    Raises:
        InvalidRequest: naming the keys outside the vocabulary or with a bad value.
    """
    bad_keys, bad_values, clean = [], [], {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            bad_keys.append(str(key))
            continue
        if not 0 <= token < vocab_size or str(key).strip() != str(token):
            bad_keys.append(str(key))
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            bad_values.append(str(key))
        else:
            clean[token] = float(value)
    if bad_keys:
        raise InvalidRequest(
            f"logit_bias keys must be token ids of this model (0..{vocab_size - 1}); "
            f"not: {', '.join(bad_keys[:20])}.",
            param="logit_bias",
        )
    if bad_values:
        raise InvalidRequest(
            f"logit_bias values must be numbers in [-100, 100]; bad for keys: {', '.join(bad_values[:20])}.",
            param="logit_bias",
        )
    return clean


class LogitBiasProcessor:
    """Adds a fixed bias to chosen token ids (OpenAI's ``logit_bias``)."""

    def __init__(self, bias: dict[int, float]) -> None:
        self._ids = torch.tensor(sorted(bias), dtype=torch.long)
        self._values = torch.tensor([bias[i] for i in sorted(bias)], dtype=torch.float32)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        ids = self._ids[self._ids < scores.shape[-1]]
        scores = scores.clone()
        scores[..., ids] += self._values[: ids.numel()].to(scores.dtype)
        return scores


class PenaltyProcessor:
    """OpenAI's presence and frequency penalties over the tokens generated so far.

    ``logit -= presence * (count > 0) + frequency * count``, counting only the output
    (not the prompt), as OpenAI and vLLM do.
    """

    def __init__(self, presence: float, frequency: float) -> None:
        self.presence = presence
        self.frequency = frequency
        self._prompt_len: Optional[int] = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        row = input_ids.reshape(-1)
        if self._prompt_len is None:
            self._prompt_len = int(row.shape[0])
        output = row[self._prompt_len :]
        if output.numel() == 0:
            return scores
        counts = torch.bincount(output, minlength=scores.shape[-1])[: scores.shape[-1]].to(scores.dtype)
        penalty = self.frequency * counts + self.presence * (counts > 0).to(scores.dtype)
        return scores - penalty.unsqueeze(0)


def token_logprobs(
    scores: torch.Tensor, token_id: int, top_k: int, tokenizer: Any = None
) -> TokenLogprob:
    """The chosen token's logprob and the ``top_k`` most likely, from processed logits.

    ``tokenizer`` turns ids into the token text OpenAI reports (the id's string when
    None). A token the processors masked out has logprob -inf; it is reported as -9999.0
    (as OpenAI does for impossible tokens) so the JSON stays valid.
    """
    logp = torch.log_softmax(scores.reshape(-1).float(), dim=-1)
    top: tuple = ()
    if top_k > 0:
        values, ids = torch.topk(logp, min(top_k, logp.shape[-1]))
        top = tuple(
            (_token_text(tokenizer, int(i)), int(i), _finite(float(v)))
            for v, i in zip(values.tolist(), ids.tolist())
        )
    return TokenLogprob(_token_text(tokenizer, token_id), int(token_id), _finite(float(logp[token_id])), top)


def _finite(value: float) -> float:
    return value if math.isfinite(value) else -9999.0


def _token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer is None:
        return str(token_id)
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def prompt_token_logprobs(model: Any, input_ids: list[int], top_k: int, tokenizer: Any) -> list[TokenLogprob]:
    """Each prompt token's logprob given the tokens before it, from one forward pass over
    the prompt (``echo`` with ``logprobs`` on completions). The first token has nothing
    before it: its entry has logprob 0.0 and no alternatives (the wire says null)."""
    with torch.inference_mode():
        logits = model(torch.tensor([input_ids]), use_cache=False).logits[0]
    first = TokenLogprob(_token_text(tokenizer, input_ids[0]), int(input_ids[0]), 0.0, ())
    return [first, *(token_logprobs(logits[i - 1], input_ids[i], top_k, tokenizer)
                     for i in range(1, len(input_ids)))]


class LogprobRecorder:
    """Keeps the last processed logits row so the sampled token's logprobs can be read.

    Put it last in the processor list; it changes nothing. The engine calls :meth:`take`
    with each sampled token.
    """

    def __init__(self, top_k: int, tokenizer: Any) -> None:
        self.top_k = top_k
        self._tokenizer = tokenizer
        self._row: Optional[torch.Tensor] = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._row = scores[0].detach().clone()
        return scores

    def take(self, token_id: int) -> Optional[TokenLogprob]:
        """The logprobs of ``token_id`` under the last row (None before any step)."""
        if self._row is None:
            return None
        return token_logprobs(self._row, token_id, self.top_k, self._tokenizer)


def build_logits_processors(request: GenerationRequest, tokenizer: Any) -> list:
    """The processors one sequence of ``request`` needs, in application order.

    Logit bias first, then penalties, then the grammar mask (last, so nothing can
    re-enable a token the grammar forbids).

    Raises:
        InvalidRequest: a bad ``logit_bias``, a ``logprobs`` count out of range, or a schema
            the grammar library cannot enforce.
    """
    sp = request.sampling
    procs: list = []
    if sp.logprobs is not None and not 0 <= sp.logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidRequest(
            f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}.", param="top_logprobs"
        )
    if sp.logit_bias:
        procs.append(LogitBiasProcessor(check_logit_bias(sp.logit_bias, len(tokenizer))))
    if sp.presence_penalty or sp.frequency_penalty:
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(sp, name) <= 2.0:
                raise InvalidRequest(f"{name} must be between -2 and 2.", param=name)
        procs.append(PenaltyProcessor(sp.presence_penalty, sp.frequency_penalty))
    schema, param = constraint_schema(request)
    if schema is not None:
        cache = grammar_cache_for(tokenizer)
        procs.append(GrammarProcessor(cache.matcher(schema, param), cache.vocab_size))
    return procs


def grammar_of(processors: list) -> Optional[GrammarProcessor]:
    """The grammar constraint among ``processors``, if any."""
    return next((p for p in processors if isinstance(p, GrammarProcessor)), None)

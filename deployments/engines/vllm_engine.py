"""The GPU text engine: vLLM's ``AsyncLLM`` behind Troupe's :class:`TextEngine` contract.

vLLM is imported only inside :meth:`VLLMTextEngine.start` (it ships in the ``gpu`` extra),
so importing this module, building the app, and the unit tests never need it. Tests inject
fakes through ``engine_factory`` (engine-args dict -> an object with the ``AsyncLLM``
surface used here) and ``sampling_params_factory`` (keyword arguments -> sampling params;
``output_kind="DELTA"`` by name, the default factory resolves it with vLLM's enum).

What the engine does per request:

1. Renders the prompt once (chat messages through the tokenizer's chat template with
   ``add_generation_prompt``; a raw prompt as is) and tokenizes it once. The token ids go
   to vLLM as a ``TokensPrompt``, so vLLM does not tokenize again and both sides count
   the same prompt tokens.
2. Rejects a request whose prompt plus ``max_tokens`` does not fit ``max_model_len``
   with :class:`~serve_app.errors.ContextLengthExceeded` *before* submitting it (vLLM
   itself would only refuse an over-long prompt, and silently cut the output short).
3. Streams vLLM's DELTA outputs as :class:`EngineOutput`: a delta may carry several
   tokens when the consumer lags (vLLM merges them) or under load (``stream_interval``,
   see :mod:`vllm_stream`), ``num_tokens`` is the number of token ids in the delta,
   ``prompt_tokens`` the prompt's length.
4. Aborts in ``finally``: closing or cancelling the stream calls ``engine.abort`` for a
   request that was submitted and has not finished, so the GPU slot is freed at once.

Tensor parallelism on Ray (``tensor_parallel_size > 1``): Serve reserves one placement
group per replica (``placement_group_bundles``, see :func:`placement_bundles`) and
schedules the replica actor in its first bundle with
``placement_group_capture_child_tasks=True``. The engine then sets
``distributed_executor_backend="ray"``: vLLM's Ray executor finds the *current* placement
group and starts one GPU worker actor per bundle inside it (the multiprocessing backend
would look for GPUs beside the replica actor, leaving the bundles' idle). So: bundles hold
the GPUs; the replica actor asks for ``num_gpus: 0`` and at most the first bundle's CPUs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import os
from typing import Any, AsyncIterator, Callable, Optional

from deployments.engines.base import check_prompt_ids, plan_output_tokens
from deployments.engines.chat_render import render_messages
from deployments.engines.tool_parsers import parser_for
from deployments.engines.vllm_lora import LoRAMethods, VLLMAdapters, lora_engine_args
from deployments.engines.vllm_stream import RecentPeak, stream_interval, without_unknown_stream_interval
from deployments.engines.vllm_structured import (
    STRUCTURED_ENGINE_DEFAULTS,
    agent_sampling_kwargs,
    shape_delta,
    template_errors,
    to_vllm_engine_args,
    to_vllm_structured,
    vllm_request_errors,
    vocab_size_of,
)
from serve_app.errors import ContextLengthExceeded, InferenceFailed, InvalidRequest
from serve_app.protocol.internal import ChatMessage, EngineFinishReason, EngineOutput, GenerationRequest
from serve_app.settings import ConfigError, VLLMEngineConfig

__all__ = ["VLLMTextEngine", "build_engine_args", "build_sampling_kwargs", "placement_bundles", "DELTA_OUTPUT_KIND"]

logger = logging.getLogger("troupe.engine.vllm")

#: Name of the ``vllm.sampling_params.RequestOutputKind`` member the engine streams with.
DELTA_OUTPUT_KIND = "DELTA"

#: vLLM finish reasons -> Troupe's. ``error`` (an engine-side failure) is raised instead.
_FINISH_REASONS: dict[str, EngineFinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}

# Prompts longer than this (characters) are rendered and tokenized in a worker thread, so
# one huge prompt does not stall the token streams of every other request on the replica.
_INLINE_TOKENIZE_CHARS = 8192

EngineFactory = Callable[[dict[str, Any]], Any]
SamplingParamsFactory = Callable[..., Any]


# --------------------------------------------------------------------------- config -> vLLM


def placement_bundles(
    config: VLLMEngineConfig, num_cpus_per_bundle: float = 1.0
) -> list[dict[str, float]]:
    """Placement group bundles for one replica: one ``{"GPU": 1, "CPU": n}`` per TP rank.

    The app builder uses these when a vLLM model with ``tensor_parallel_size > 1`` sets
    no ``placement_group_bundles`` of its own (with ``STRICT_PACK``, so all ranks share a
    node and its NVLink). Serve puts the replica actor in the first bundle, so the
    replica's ``ray_actor_options`` must ask for ``num_gpus: 0`` and at most
    ``num_cpus_per_bundle`` CPUs; vLLM's Ray workers take the GPUs.
    """
    if num_cpus_per_bundle < 0:
        raise ValueError("num_cpus_per_bundle must be >= 0")
    return [
        {"GPU": 1.0, "CPU": float(num_cpus_per_bundle)}
        for _ in range(config.tensor_parallel_size)
    ]


def build_engine_args(model_id: str, config: VLLMEngineConfig) -> dict[str, Any]:
    """Keyword arguments for ``vllm.AsyncEngineArgs`` from a model's engine config.

    ``extra_engine_args`` pass through, but may not restate a typed field: a silent
    override of e.g. ``tensor_parallel_size`` would desynchronise the engine from the
    placement group Serve reserved for it.

    Raises:
        ConfigError: an ``extra_engine_args`` key duplicates a typed field.
    """
    args: dict[str, Any] = {
        # "~" as in the other engines' paths (config/vllm-cpu.yaml names Troupe's model cache).
        "model": os.path.expanduser(config.model),
        "served_model_name": model_id,
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "dtype": config.dtype,
        "enforce_eager": config.enforce_eager,
    }
    if config.max_model_len is not None:
        args["max_model_len"] = config.max_model_len
    args.update(lora_engine_args(config))  # LoRA adapters (issue 19)
    if config.tensor_parallel_size > 1:
        # Use the replica's placement group (see the module docstring).
        args["distributed_executor_backend"] = "ray"
    clash = sorted(set(config.extra_engine_args) & set(args))
    if clash:
        raise ConfigError(
            f"model {model_id!r}: engine.extra_engine_args repeats {clash}; set these "
            "through their own engine fields (e.g. engine.tensor_parallel_size: 2) and "
            "drop them from extra_engine_args."
        )
    args.update(config.extra_engine_args)
    args.setdefault("structured_outputs_config", dict(STRUCTURED_ENGINE_DEFAULTS))
    return args


def build_sampling_kwargs(
    request: GenerationRequest, max_tokens: int, tokenizer: Any = None, interval: int = 1
) -> dict[str, Any]:
    """Keyword arguments for ``vllm.SamplingParams`` (``output_kind`` by member name; a
    constraint as a plain ``structured_outputs`` dict, see :mod:`vllm_structured`;
    ``interval`` tokens per streamed chunk, see :mod:`vllm_stream`)."""
    sp = request.sampling
    kwargs: dict[str, Any] = {
        "max_tokens": max_tokens,
        "temperature": sp.temperature,
        "top_p": sp.top_p,
        "output_kind": DELTA_OUTPUT_KIND,
    }
    if interval > 1:
        kwargs["stream_interval"] = interval
    if sp.seed is not None:
        kwargs["seed"] = sp.seed
    if sp.stop:
        kwargs["stop"] = list(sp.stop)
    kwargs.update(agent_sampling_kwargs(request, tokenizer))
    return kwargs


# --------------------------------------------------------------------------- lazy vLLM


def _vllm_engine_factory(engine_args: dict[str, Any]) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    from deployments.engines.vllm_cpu_affinity import pin_after_cpu_start

    engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**to_vllm_engine_args(engine_args)))
    pin_after_cpu_start()  # on CPU: the front end and engine core off the worker's cores
    return engine


def _vllm_sampling_params_factory() -> SamplingParamsFactory:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    kinds = RequestOutputKind.__members__

    def make(**kwargs: Any) -> Any:
        kwargs["output_kind"] = kinds[kwargs["output_kind"]]
        kwargs = without_unknown_stream_interval(kwargs, SamplingParams)
        return SamplingParams(**to_vllm_structured(kwargs))

    return make


def _in_placement_group() -> bool:
    import ray

    return ray.is_initialized() and ray.util.get_current_placement_group() is not None


# --------------------------------------------------------------------------- engine


class _Flight:
    """One submitted request: whether someone asked to abort it."""

    __slots__ = ("aborting",)

    def __init__(self) -> None:
        self.aborting = False


class VLLMTextEngine(LoRAMethods):
    """Troupe's text engine over vLLM ``AsyncLLM`` with DELTA outputs.

    Args:
        model_id: the id clients use (vLLM's ``served_model_name``).
        config: the model's :class:`VLLMEngineConfig`.
        engine_factory: builds the engine from :func:`build_engine_args`' dict; default
            ``AsyncLLM.from_engine_args``. Tests pass a fake.
        sampling_params_factory: builds sampling params from
            :func:`build_sampling_kwargs`' dict; default ``vllm.SamplingParams`` with
            ``output_kind`` resolved to ``RequestOutputKind.DELTA``. Tests pass a recorder.
        lora_request_factory: builds LoRA requests; default ``vllm``'s ``LoRARequest``.
    """

    def __init__(
        self,
        model_id: str,
        config: VLLMEngineConfig,
        *,
        engine_factory: Optional[EngineFactory] = None,
        sampling_params_factory: Optional[SamplingParamsFactory] = None,
        lora_request_factory: Optional[Callable[..., Any]] = None,
    ) -> None:
        self.model_id = model_id
        self.config = config
        self.engine_args = build_engine_args(model_id, config)  # config errors fail early
        #: Known for sure only after start(); until then the configured override (or 0).
        self.context_length: int = config.max_model_len or 0
        self._engine_factory = engine_factory
        self._sampling_params_factory = sampling_params_factory
        self._request_errors: tuple[type[BaseException], ...] = (ValueError,)
        self._template_errors: tuple[type[BaseException], ...] = (ValueError,)
        self._engine: Any = None
        self._tokenizer: Any = None
        self._active: dict[str, _Flight] = {}
        self._load = RecentPeak()  # streams running lately: how many tokens a chunk carries
        self.lora = VLLMAdapters(model_id, config.max_loras is not None, lora_request_factory)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Create the engine (loads weights) and read its tokenizer and context size."""
        if self._engine is not None:
            return
        if self._engine_factory is None or self._sampling_params_factory is None:
            self._bind_vllm()
        self._template_errors = template_errors()
        engine_factory = self._engine_factory
        assert engine_factory is not None  # _bind_vllm filled what the caller did not inject
        # Off the loop: a load (~40 s on CPU) must not stall a gateway hosting it (run_in:
        # gateway); AsyncLLM then starts its output handler on the first request, here.
        engine = await asyncio.to_thread(engine_factory, dict(self.engine_args))
        tokenizer = engine.get_tokenizer()
        if inspect.isawaitable(tokenizer):  # older vLLM releases made it a coroutine
            tokenizer = await tokenizer
        self._tokenizer = tokenizer
        self.context_length = int(engine.model_config.max_model_len)
        self._engine = engine

    def _bind_vllm(self) -> None:
        """Import vLLM (first and only time) and fill the factories tests did not inject."""
        try:
            import vllm  # noqa: F401  (fail early, with a message that says what to do)
        except ImportError as exc:
            raise InferenceFailed(
                f"Model {self.model_id!r} uses the vllm engine, but vLLM is not installed "
                "on this node. Install the GPU extra (pip install 'troupe-serve[gpu]') on "
                "GPU nodes.",
                details={"exception": type(exc).__name__},
            ) from exc
        self._request_errors = vllm_request_errors()
        if self._engine_factory is None:
            self._engine_factory = _vllm_engine_factory
        if self._sampling_params_factory is None:
            self._sampling_params_factory = _vllm_sampling_params_factory()
        self.lora.bind_vllm()
        if self.config.tensor_parallel_size > 1 and not _in_placement_group():
            logger.warning(
                "model %s: tensor_parallel_size=%d but the replica runs outside a placement "
                "group; vLLM will reserve GPUs on its own. Set "
                "deployment.placement_group_bundles (see placement_bundles()).",
                self.model_id,
                self.config.tensor_parallel_size,
            )

    async def shutdown(self) -> None:
        """Stop the engine (its core process and, with TP, its Ray workers)."""
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()

    def active_requests(self) -> int:
        return len(self._active)

    async def abort(self, request_id: str) -> None:
        """Abort a running request; its stream ends with ``finish_reason="abort"``."""
        flight = self._active.get(request_id)
        if flight is None or self._engine is None:
            return
        flight.aborting = True
        await self._engine.abort(request_id)

    # ------------------------------------------------------------------ requests

    def _render(self, request: GenerationRequest) -> list[int]:
        tok = self._tokenizer
        if request.messages is not None:
            messages, tools = render_messages(request, tok)
            extra = {"tools": tools} if tools else {}
            try:
                text = tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, **extra
                )
            except self._template_errors as exc:
                # Templates refuse some conversations on purpose (e.g. roles that do not
                # alternate, or a system turn the model has no slot for): the client's to fix.
                raise InvalidRequest(
                    f"Model {self.model_id!r} cannot render these messages with its chat "
                    f"template: {exc}. Adjust the conversation (many models need user and "
                    "assistant turns to alternate, starting with user), e.g. "
                    '[{"role": "user", "content": "Hello"}].',
                    param="messages",
                ) from None
            # The template already places BOS and the role markers.
            return list(tok.encode(text, add_special_tokens=False))
        return list(tok.encode(request.prompt or ""))

    async def _prompt_token_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return check_prompt_ids(request.prompt_token_ids, vocab_size_of(self._tokenizer))
        if request.messages is None and not request.raw and getattr(self._tokenizer, "chat_template", None):
            # A native prompt for a chat model is one user turn (raw: as is), as on the CPU
            # engine: an instruct model given bare text often stops at once.
            request = dataclasses.replace(request, messages=[ChatMessage("user", request.prompt or "")])
        if request.messages is not None:
            size = sum(len(m.content) for m in request.messages)
        else:
            size = len(request.prompt or "")
        if size > _INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(self._render, request)
        return self._render(request)

    def _max_tokens(self, request: GenerationRequest, prompt_tokens: int) -> int:
        if prompt_tokens == 0:
            raise InvalidRequest(
                "The prompt is empty after rendering, and the model needs at least one "
                'prompt token. Send some text, e.g. {"prompt": "Hello"}.',
                param="messages" if request.messages is not None else "prompt",
            )
        sampling = request.sampling
        return plan_output_tokens(
            self.context_length,
            prompt_tokens,
            sampling.max_tokens,
            "messages" if request.messages is not None else "prompt",
            sampling.default_max_tokens,
        )

    def _sampling_params(self, request: GenerationRequest, max_tokens: int) -> Any:
        factory = self._sampling_params_factory
        assert factory is not None  # start() bound it before any request
        interval = stream_interval(self.config.stream_interval, self._load.update(len(self._active)))
        try:
            kwargs = build_sampling_kwargs(request, max_tokens, self._tokenizer, interval)
            return factory(**kwargs)
        except self._request_errors as exc:  # SamplingParams validates its own ranges
            raise InvalidRequest(
                f"The engine refused the sampling parameters: {exc}. Send values in range, "
                'e.g. {"temperature": 0.7, "top_p": 0.95, "max_tokens": 256}.',
                param=getattr(exc, "parameter", None),
            ) from None

    def _rejected(
        self, exc: BaseException, request: GenerationRequest, prompt_tokens: int, max_tokens: int
    ) -> Exception:
        """Translate vLLM refusing a request at submission into a Troupe error.

        Refusals are typed, not parsed: vLLM raises a ValueError (or, in newer
        releases, a VLLMValidationError, possibly wrapped as the ``__cause__`` of an
        EngineGenerateError) before the first output. A validation error that names a
        ``parameter`` is an invalid field. Anything else is about the input itself, and
        with token ids rendered by the model's own tokenizer and an empty prompt caught
        above, the input check vLLM still makes is its prompt-length limit.
        """
        cause = exc if isinstance(exc, self._request_errors) else exc.__cause__
        parameter = getattr(cause, "parameter", None)
        if parameter is not None:
            return InvalidRequest(
                f"The engine refused the request's {parameter!r}: {cause}",
                param=str(parameter),
            )
        return ContextLengthExceeded(
            f"The engine refused the prompt ({prompt_tokens} tokens, max_tokens "
            f"{max_tokens}) as longer than this model's context of {self.context_length} "
            f"tokens: {cause}. Shorten the prompt or lower max_tokens.",
            param="messages" if request.messages is not None else "prompt",
            details={"context_length": self.context_length, "prompt_tokens": prompt_tokens},
        )

    def _is_rejection(self, exc: BaseException) -> bool:
        """vLLM refused the request at submission (see :meth:`_rejected`)."""
        return isinstance(exc, self._request_errors) or isinstance(
            exc.__cause__, self._request_errors
        )

    def _admit(self, request: GenerationRequest) -> Any:
        engine = self._engine
        if engine is None:
            raise InferenceFailed(
                f"The vLLM engine for model {self.model_id!r} is not started; the replica "
                "is still loading or failed to load. Retry in a moment."
            )
        if request.request_id in self._active:
            raise InvalidRequest(
                f"Request id {request.request_id!r} is already running on this model; "
                "each request needs its own id."
            )
        return engine

    async def _first_output(
        self, stream: Any, request: GenerationRequest, prompt_tokens: int, max_tokens: int
    ) -> Any:
        """The stream's first output (None if it ended), with refusals translated."""
        try:
            return await anext(stream, None)
        except Exception as exc:
            if self._is_rejection(exc):
                raise self._rejected(exc, request, prompt_tokens, max_tokens) from None
            raise

    async def generate(self, request: GenerationRequest) -> AsyncIterator[EngineOutput]:
        """Stream deltas for one request (the contract is in ``engines/base.py``)."""
        engine = self._admit(request)
        request_id = request.request_id
        prompt_ids = await self._prompt_token_ids(request)
        prompt_tokens = len(prompt_ids)
        max_tokens = self._max_tokens(request, prompt_tokens)
        params = self._sampling_params(request, max_tokens)
        parser = parser_for(request, self.config.tool_call_parser)
        top_k = request.sampling.logprobs
        lora = self.lora.request_kwargs(request)  # an unknown adapter fails before the flight
        if request.sampling.echo:  # set by the gateway for token-id prompts: only we can detokenize
            yield EngineOutput(self._tokenizer.decode(prompt_ids), 0, prompt_tokens)
        flight = _Flight()
        self._active[request_id] = flight
        stream = engine.generate({"prompt_token_ids": prompt_ids}, params, request_id, **lora)
        finished = False  # vLLM reported a finish reason: nothing left to abort
        try:
            out = await self._first_output(stream, request, prompt_tokens, max_tokens)
            while out is not None:
                completion = out.outputs[0]
                reason = completion.finish_reason
                if reason is None and not flight.aborting:
                    shaped = shape_delta(parser, completion, top_k, final=False)
                    yield EngineOutput(num_tokens=len(completion.token_ids), prompt_tokens=prompt_tokens, **shaped)
                    out = await anext(stream, None)
                    continue
                finished = reason is not None
                # An aborted request ends here even if this vLLM emits no final ABORT output.
                final = self._finish_reason(reason, request_id) if finished else "abort"
                # vLLM's stop_reason is the matched stop string (or a stop token id).
                matched = completion.stop_reason
                matched = matched if final == "stop" and isinstance(matched, str) else None
                shaped = shape_delta(parser, completion, top_k, final=True)
                if final == "stop" and parser is not None and parser.calls_made:
                    final = "tool_calls"
                yield EngineOutput(num_tokens=len(completion.token_ids), prompt_tokens=prompt_tokens,
                                   finish_reason=final, stop_sequence=matched, **shaped)
                return
        finally:
            self._active.pop(request_id, None)
            try:
                if not finished:
                    await engine.abort(request_id)
            finally:
                await stream.aclose()

    def _finish_reason(self, reason: str, request_id: str) -> EngineFinishReason:
        mapped = _FINISH_REASONS.get(str(reason))
        if mapped is not None:
            return mapped
        if str(reason) == "error":
            raise InferenceFailed(
                f"Model {self.model_id!r} failed while generating request {request_id!r} "
                "(the engine reported an internal error). Retry the request.",
                details={"finish_reason": "error"},
            )
        logger.warning(
            "model %s: unknown vLLM finish reason %r, reported as stop", self.model_id, reason
        )
        return "stop"


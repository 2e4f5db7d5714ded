"""A fake vLLM AsyncLLM and helpers for the VLLMTextEngine tests (no vLLM, no GPU).

The fake keeps the parts of vLLM's contract the engine relies on: ``generate`` is an
async generator of DELTA ``RequestOutput``-like objects (a step that produced several
tokens before the consumer read arrives as one merged delta), it refuses an over-long
prompt with a ValueError at submission, ``abort`` ends a running stream with a final
``finish_reason="abort"`` output, and closing the generator aborts the request inside
the engine.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any, Optional

import jinja2

from deployments.engines.vllm_engine import (
    VLLMTextEngine,
)
from serve_app.settings import VLLMEngineConfig
from serve_app.protocol.internal import ChatMessage, GenerationRequest, SamplingParams

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- the fake


class FakeTokenizer:
    """Whitespace 'tokenizer'; its chat template writes BOS itself, like real ones."""

    def __init__(self, bos: Optional[int] = 1, alternating_roles_only: bool = False) -> None:
        self.bos = bos
        self.alternating_roles_only = alternating_roles_only
        self.template_calls: list[dict[str, Any]] = []

    def apply_chat_template(self, conversation, *, tokenize, add_generation_prompt):
        self.template_calls.append(
            {"conversation": conversation, "tokenize": tokenize,
             "add_generation_prompt": add_generation_prompt}
        )
        if self.alternating_roles_only and conversation[0]["role"] != "user":
            # what a template's raise_exception() does
            raise jinja2.TemplateError("Conversation roles must alternate user/assistant/...")
        text = " ".join(f"<|{m['role']}|> {m['content']}" for m in conversation)
        if add_generation_prompt:
            text += " <|assistant|>"
        return "<s> " + text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = [100 + i for i, _ in enumerate(text.split())]
        if add_special_tokens and self.bos is not None:
            ids.insert(0, self.bos)
        return ids


class FakeCompletion:
    def __init__(self, text: str, token_ids: list[int], finish_reason: Optional[str]):
        self.index = 0
        self.text = text
        self.token_ids = token_ids
        self.finish_reason = finish_reason
        self.stop_reason: Any = None  # vLLM: the matched stop string, a stop token id, or None


class FakeRequestOutput:
    def __init__(self, request_id, prompt_token_ids, completion: FakeCompletion):
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.outputs = [completion]
        self.finished = completion.finish_reason is not None


class FakeModelConfig:
    def __init__(self, max_model_len: int) -> None:
        self.max_model_len = max_model_len


class Submission:
    def __init__(self, prompt, sampling_params, request_id, lora_request=None) -> None:
        self.prompt = prompt
        self.sampling_params = sampling_params
        self.request_id = request_id
        self.lora_request = lora_request


class FakeLoRARequest:
    """vllm.lora.request.LoRARequest's fields."""

    def __init__(self, lora_name: str, lora_int_id: int, lora_path: str) -> None:
        self.lora_name, self.lora_int_id, self.lora_path = lora_name, lora_int_id, lora_path


class RecordedSamplingParams:
    """Stands in for vllm.SamplingParams: keeps the keyword arguments it was built with."""

    def __init__(self, **kwargs: Any) -> None:
        self.kwargs = kwargs


class FakeAsyncLLM:
    """The AsyncLLM surface VLLMTextEngine uses.

    ``script``: the steps the engine produces for a request. Each step is the list of
    tokens generated before the consumer's next read, so it arrives as one merged delta.
    ``finish``: the reason on the last step; None keeps the request running until aborted.
    """

    def __init__(
        self,
        engine_args: dict[str, Any],
        *,
        max_model_len: int = 64,
        script: Optional[list[list[str]]] = None,
        finish: Optional[str] = "stop",
        emits_abort_output: bool = True,
        stop_reason: Any = None,
        reject_with: Optional[BaseException] = None,
        tokenizer: Optional[FakeTokenizer] = None,
    ) -> None:
        self.engine_args = engine_args
        self.model_config = FakeModelConfig(max_model_len)
        self.tokenizer = tokenizer or FakeTokenizer()
        self.script = script if script is not None else [["Hello"], [" big", " wide"], [" world"]]
        self.finish = finish
        self.emits_abort_output = emits_abort_output
        self.stop_reason = stop_reason
        self.reject_with = reject_with
        self.submitted: list[Submission] = []
        self.aborted: list[str] = []
        self.closed_by_consumer: list[str] = []
        self.running: dict[str, asyncio.Event] = {}
        self.shutdown_calls = 0
        self.loras: dict[int, FakeLoRARequest] = {}  # lora_int_id -> request (add_lora)

    def get_tokenizer(self) -> FakeTokenizer:
        return self.tokenizer

    def _output(self, request_id, prompt_ids, tokens, finish):
        ids = [1000 + len(t) for t in tokens]
        return FakeRequestOutput(request_id, prompt_ids, FakeCompletion("".join(tokens), ids, finish))

    async def add_lora(self, lora_request: FakeLoRARequest) -> bool:
        """Like vLLM: the adapter's files are read now; a rank above max_lora_rank fails."""
        config = Path(lora_request.lora_path) / "adapter_config.json"
        if not config.is_file():
            raise ValueError(f"Loading lora {lora_request.lora_name} failed: No adapter found "
                             f"for {lora_request.lora_path}")
        rank = json.loads(config.read_text())["r"]
        if rank > self.engine_args.get("max_lora_rank", 16):
            raise ValueError(f"LoRA rank {rank} is greater than max_lora_rank "
                             f"{self.engine_args.get('max_lora_rank', 16)}.")
        self.loras[lora_request.lora_int_id] = lora_request
        return True

    async def remove_lora(self, lora_id: int) -> bool:
        return self.loras.pop(lora_id, None) is not None

    async def list_loras(self) -> set[int]:
        return set(self.loras)

    async def generate(self, prompt, sampling_params, request_id, lora_request=None):
        self.submitted.append(Submission(prompt, sampling_params, request_id, lora_request))
        if lora_request is not None and lora_request.lora_int_id not in self.loras:
            raise ValueError(f"LoRA {lora_request.lora_name} is not loaded")
        prompt_ids = prompt["prompt_token_ids"]
        if self.reject_with is not None:
            raise self.reject_with
        if len(prompt_ids) >= self.model_config.max_model_len:
            raise ValueError(
                f"The decoder prompt (length {len(prompt_ids)}) is longer than the maximum "
                f"model length of {self.model_config.max_model_len}."
            )
        aborted = asyncio.Event()
        self.running[request_id] = aborted
        # vLLM's per-request stream_interval: the first tokens at once, then a delta per
        # `interval` tokens, the rest with the finish (its output processor's rule).
        interval = getattr(sampling_params, "kwargs", {}).get("stream_interval", 1)
        held: list[str] = []
        sent = False
        try:
            for i, step in enumerate(self.script):
                await asyncio.sleep(0)  # the engine produces asynchronously
                if aborted.is_set() and self.emits_abort_output:
                    yield self._output(request_id, prompt_ids, [], "abort")
                    return
                last = i == len(self.script) - 1
                reason = self.finish if last else None
                held += step
                if sent and reason is None and len(held) < interval:
                    continue
                step, held, sent = held, [], True
                output = self._output(request_id, prompt_ids, step, reason)
                if reason is not None:
                    output.outputs[0].stop_reason = self.stop_reason
                yield output
                if reason is not None:
                    return
            await aborted.wait()
            if self.emits_abort_output:
                yield self._output(request_id, prompt_ids, [], "abort")
        except (GeneratorExit, asyncio.CancelledError):
            self.closed_by_consumer.append(request_id)
            raise
        finally:
            self.running.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        event = self.running.get(request_id)
        if event is not None:
            event.set()

    def shutdown(self) -> None:
        self.shutdown_calls += 1


# --------------------------------------------------------------------------- helpers


def vllm_config(**overrides: Any) -> VLLMEngineConfig:
    return VLLMEngineConfig(**{"model": "/models/fake", **overrides})


async def started_engine(
    config: Optional[VLLMEngineConfig] = None, **fake_kwargs: Any
) -> tuple[VLLMTextEngine, FakeAsyncLLM]:
    fakes: list[FakeAsyncLLM] = []

    def factory(engine_args: dict[str, Any]) -> FakeAsyncLLM:
        fakes.append(FakeAsyncLLM(engine_args, **fake_kwargs))
        return fakes[-1]

    engine = VLLMTextEngine(
        "fake-model",
        config or vllm_config(),
        engine_factory=factory,
        sampling_params_factory=RecordedSamplingParams,
        lora_request_factory=FakeLoRARequest,
    )
    await engine.start()
    return engine, fakes[0]


def chat(request_id: str = "r1", max_tokens: Optional[int] = 8, **sampling: Any) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        sampling=SamplingParams(max_tokens=max_tokens, **sampling),
        messages=[ChatMessage("system", "be brief"), ChatMessage("user", "hi there")],
    )


def raw(prompt: str, request_id: str = "r1", max_tokens: Optional[int] = 8) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id, sampling=SamplingParams(max_tokens=max_tokens), prompt=prompt
    )


async def until(condition, timeout_s: float = 2.0) -> None:
    """Wait for ``condition()`` to hold, failing after a deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0)


# the chat template renders "<s> <|system|> be brief <|user|> hi there <|assistant|>"
CHAT_PROMPT_TOKENS = 8

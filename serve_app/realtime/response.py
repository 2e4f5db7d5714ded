"""One realtime response: the text model's answer, spoken sentence by sentence.

:class:`ResponseRun` emits the protocol's response events in order: ``response.created``,
the message item and its content part once the model writes text, text or transcript
deltas as it writes, ``response.output_audio.delta`` as each finished sentence is
synthesised (resampled to the session's output format), a ``function_call`` item with
``response.function_call_arguments.delta`` fragments for each tool call the model makes,
the ``.done`` events and ``response.done`` with usage and every output item.

Cancelling its task (``response.cancel``, or speech during the answer) closes the model
streams, which aborts the text and speech engines' requests; the run then ends the item
as ``incomplete`` and the response as ``cancelled``, keeping in the conversation only the
words whose audio was played (estimated as real-time playback from the first delta, the
same assumption OpenAI's server makes for WebSocket clients).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from serve_app.errors import TroupeError, as_troupe_error
from serve_app.protocol.internal import (
    ChatMessage,
    GenerationRequest,
    SamplingParams,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
)
from serve_app.realtime.audio import AudioFormat, Resampler
from serve_app.realtime.conversation import function_call_item, message_item, new_id
from serve_app.realtime.models import Models, ResponseFigures, Trio

__all__ = ["ResponsePlan", "ResponseRun"]

_SENTENCE_END = re.compile(r"[.!?](\s|$)")
#: Largest audio delta sent (ms): small enough that played-time estimates stay close.
DELTA_MS = 200


@dataclass(slots=True)
class ResponsePlan:
    """Everything a response needs, resolved from the session and ``response.create``."""

    trio: Trio
    audio: bool
    instructions: str
    max_tokens: Optional[int]
    temperature: float
    voice: str
    speed: float
    out_format: AudioFormat
    in_conversation: bool
    metadata: Optional[dict[str, str]] = None
    turn_ended_at: float = field(default_factory=time.perf_counter)
    audio_in_s: float = 0.0
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    parallel_tool_calls: bool = True


class ResponseRun:
    """Produces one response's events through ``emit``; see the module docstring."""

    def __init__(self, models: Models, plan: ResponsePlan, messages: list[ChatMessage],
                 emit: Callable[[dict[str, Any]], Awaitable[None]], request_id: str,
                 add_item: Optional[Callable[[dict[str, Any]], Optional[str]]] = None) -> None:
        self.models = models
        #: Puts an output item in the conversation (None: an out-of-band response).
        self.add_item = add_item
        self.plan = plan
        self.messages = messages
        self.emit = emit
        self.id = new_id("resp")
        self.request_id = request_id
        part_type = "output_audio" if plan.audio else "output_text"
        self.part: dict[str, Any] = ({"type": part_type, "transcript": ""} if plan.audio
                                     else {"type": part_type, "text": ""})
        self.item = message_item("assistant", [self.part], "in_progress")
        #: Output items in order: the message (once text comes) and each function call.
        self.outputs: list[dict[str, Any]] = []
        self.calls: dict[int, dict[str, Any]] = {}  # by the engine's call index
        self.cancel_reason: Optional[str] = None
        self.text = ""
        self.spoken: list[tuple[str, int]] = []  # (sentence, audio ms at its end)
        self.sent_ms = 0
        self.first_audio_at: Optional[float] = None
        self.usage = (0, 0)
        self.figures = ResponseFigures(plan.trio.llm, "in_progress", audio_in_s=plan.audio_in_s)

    # ------------------------------------------------------------------ wire

    def wire(self, status: str, details: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        prompt, completion = self.usage
        body: dict[str, Any] = {
            "id": self.id, "object": "realtime.response", "status": status,
            "status_details": details, "output": self.outputs if status != "in_progress" else [],
            "conversation_id": "auto" if self.plan.in_conversation else None,
            "output_modalities": ["audio" if self.plan.audio else "text"],
            "max_output_tokens": self.plan.max_tokens or "inf",
            "metadata": self.plan.metadata,
            "audio": {"output": {"format": self.plan.out_format.as_dict(), "voice": self.plan.voice}},
            "usage": None,
        }
        if status != "in_progress":
            body["usage"] = {
                "total_tokens": prompt + completion, "input_tokens": prompt, "output_tokens": completion,
                "input_token_details": {"text_tokens": prompt, "audio_tokens": 0, "cached_tokens": 0},
                "output_token_details": {"text_tokens": completion, "audio_tokens": 0},
            }
            fig = self.figures
            body["troupe"] = {  # Troupe's own figures (not in OpenAI's schema)
                "models": {"asr": self.plan.trio.asr, "llm": self.plan.trio.llm, "tts": self.plan.trio.tts},
                "audio_in_seconds": round(fig.audio_in_s, 3),
                "audio_out_seconds": round(fig.audio_out_s, 3),
                "ttfa_ms": None if fig.ttfa_ms is None else round(fig.ttfa_ms, 1),
                "cost_usd": self.models.price(self.plan.trio.llm, prompt, completion),
            }
        return body

    def _where(self) -> dict[str, Any]:
        return {"response_id": self.id, "item_id": self.item["id"],
                "output_index": self.outputs.index(self.item), "content_index": 0}

    def _event_part(self) -> dict[str, Any]:
        """The content part as ``response.content_part.*`` events carry it: typed ``text`` or
        ``audio`` there (the item itself says ``output_text`` / ``output_audio``)."""
        return {**self.part, "type": "audio" if self.plan.audio else "text"}

    @property
    def has_message(self) -> bool:
        """Whether the message item was opened (the model wrote text, or nothing at all)."""
        return self.item in self.outputs

    # ------------------------------------------------------------------ playback

    def played_ms(self, now: Optional[float] = None) -> int:
        """Audio the client has played, assuming real-time playback from the first delta."""
        if self.first_audio_at is None:
            return 0
        elapsed = ((now or time.perf_counter()) - self.first_audio_at) * 1000
        return int(min(self.sent_ms, elapsed))

    def heard_text(self, audio_end_ms: int) -> str:
        """The transcript of the sentences fully played by ``audio_end_ms``."""
        return "".join(s for s, end in self.spoken if end <= audio_end_ms).strip()

    # ------------------------------------------------------------------ run

    async def run(self) -> ResponseFigures:
        try:
            await self.emit({"type": "response.created", "response": self.wire("in_progress")})
            status, details = "completed", None
            try:
                await self._produce()
            except asyncio.CancelledError:
                status = "cancelled"
                details = {"type": "cancelled", "reason": self.cancel_reason or "client_cancelled"}
                if self.cancel_reason is None:
                    self.figures.status = status
                    raise  # not ours (the socket closed): nobody to tell
            except TroupeError as exc:
                status, details = "failed", self._failure(exc)
            except Exception as exc:  # a response always ends in response.done
                status, details = "failed", self._failure(as_troupe_error(exc))
            await self._finish(status, details)
            return self.figures
        finally:  # however it ended, the answer's ledger row gets its audio figures
            self.models.meter(self.request_id + ":llm", self.figures)

    async def _add_output(self, item: dict[str, Any]) -> None:
        self.outputs.append(item)
        await self.emit({"type": "response.output_item.added", "response_id": self.id,
                         "output_index": len(self.outputs) - 1, "item": copy.deepcopy(item)})
        if self.add_item is not None:
            before = self.add_item(item)
            await self.emit({"type": "conversation.item.added", "item": copy.deepcopy(item),
                             "previous_item_id": before})

    async def _open_message(self) -> None:
        if self.has_message:
            return
        await self._add_output(self.item)
        await self.emit({"type": "response.content_part.added", **self._where(),
                         "part": self._event_part()})

    async def _call_delta(self, delta: ToolCallDelta) -> None:
        """One fragment of a tool call: a new function_call item, or more arguments."""
        call = self.calls.get(delta.index)
        if call is None:
            call = function_call_item(delta.id or new_id("call"), delta.name or "")
            self.calls[delta.index] = call
            await self._add_output(call)
        if delta.arguments:
            call["arguments"] += delta.arguments
            await self.emit({"type": "response.function_call_arguments.delta", "response_id": self.id,
                             "item_id": call["id"], "output_index": self.outputs.index(call),
                             "call_id": call["call_id"], "delta": delta.arguments})

    def _failure(self, err: TroupeError) -> dict[str, Any]:
        return {"type": "failed", "error": {"type": "server_error" if err.status >= 500
                                            else "invalid_request_error",
                                            "code": err.code.lower(), "message": err.message}}

    async def _produce(self) -> None:
        plan = self.plan
        pending = ""
        request = GenerationRequest(
            self.request_id + ":llm", SamplingParams(max_tokens=plan.max_tokens, temperature=plan.temperature),
            self.messages, tools=plan.tools, tool_choice=plan.tool_choice,
            parallel_tool_calls=plan.parallel_tool_calls)
        async with contextlib.aclosing(self.models.generate(plan.trio.llm, request)) as chunks:
            async for chunk in chunks:
                if chunk.finish_reason is not None:
                    self.usage = (chunk.prompt_tokens, chunk.completion_tokens)
                else:
                    self.usage = (chunk.prompt_tokens or self.usage[0], self.usage[1] + chunk.num_tokens)
                for delta in chunk.tool_calls or ():
                    await self._call_delta(delta)
                if not chunk.text:
                    continue
                await self._open_message()
                self.text += chunk.text
                kind = "response.output_audio_transcript.delta" if plan.audio else "response.output_text.delta"
                await self.emit({"type": kind, **self._where(), "delta": chunk.text})
                if not plan.audio:
                    continue
                pending += chunk.text
                ends = list(_SENTENCE_END.finditer(pending))
                match = ends[-1] if ends else None
                if match is not None:  # speak each finished sentence while the model writes on
                    sentence, pending = pending[: match.end()], pending[match.end():]
                    await self._speak(sentence)
        if plan.audio:
            await self._speak(pending, last=True)

    async def _speak(self, sentence: str, last: bool = False) -> None:
        plan = self.plan
        assert plan.trio.tts is not None
        resample: Optional[Resampler] = None
        if sentence.strip():
            async with contextlib.aclosing(self.models.speak(
                    plan.trio.tts, sentence, plan.voice, plan.speed, self.request_id + ":tts")) as chunks:
                async for chunk in chunks:
                    if resample is None:
                        resample = Resampler(chunk.sample_rate, plan.out_format.rate)
                    await self._send_audio(resample(chunk.data, last=chunk.last))
        self.spoken.append((sentence, self.sent_ms))

    async def _send_audio(self, pcm: bytes) -> None:
        fmt = self.plan.out_format
        step = fmt.rate * 2 * DELTA_MS // 1000
        for start in range(0, len(pcm), step):
            piece = pcm[start:start + step]
            if self.first_audio_at is None:
                self.first_audio_at = time.perf_counter()
                self.figures.ttfa_ms = (self.first_audio_at - self.plan.turn_ended_at) * 1000
            await self.emit({"type": "response.output_audio.delta", **self._where(),
                             "delta": base64.b64encode(fmt.from_pcm16(piece)).decode()})
            self.sent_ms += fmt.ms_of(len(piece))
            self.figures.audio_out_s = self.sent_ms / 1000

    async def _finish(self, status: str, details: Optional[dict[str, Any]]) -> None:
        if not self.outputs:  # an empty answer still has its (empty) message
            await self._open_message()
        if self.has_message:
            await self._finish_message(status)
        for call in self.calls.values():
            call["status"] = "completed" if status == "completed" else "incomplete"
            index = self.outputs.index(call)
            await self.emit({"type": "response.function_call_arguments.done", "response_id": self.id,
                             "item_id": call["id"], "output_index": index, "call_id": call["call_id"],
                             "name": call["name"], "arguments": call["arguments"]})
            await self._output_done(call, index)
        self.figures.status = status
        self.figures.prompt_tokens, self.figures.completion_tokens = self.usage
        await self.emit({"type": "response.done", "response": self.wire(status, details)})

    async def _finish_message(self, status: str) -> None:
        where = self._where()
        if self.plan.audio:
            self.part["transcript"] = self.text
            await self.emit({"type": "response.output_audio.done", **where})
            await self.emit({"type": "response.output_audio_transcript.done", **where,
                             "transcript": self.text})
        else:
            self.part["text"] = self.text
            await self.emit({"type": "response.output_text.done", **where, "text": self.text})
        await self.emit({"type": "response.content_part.done", **where, "part": self._event_part()})
        self.item["status"] = "completed" if status == "completed" else "incomplete"
        await self._output_done(self.item, where["output_index"])

    async def _output_done(self, item: dict[str, Any], index: int) -> None:
        await self.emit({"type": "response.output_item.done", "response_id": self.id,
                         "output_index": index, "item": copy.deepcopy(item)})
        if self.add_item is not None:
            await self.emit({"type": "conversation.item.done", "item": copy.deepcopy(item)})

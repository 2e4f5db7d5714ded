"""One realtime response: the text model's answer, spoken sentence by sentence.

:class:`ResponseRun` emits the protocol's response events in order: ``response.created``,
the output item and its content part, text or transcript deltas as the text model writes,
``response.output_audio.delta`` as each finished sentence is synthesised (resampled to
the session's output format), the ``.done`` events and ``response.done`` with usage.

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
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from serve_app.errors import TroupeError, as_troupe_error
from serve_app.protocol.internal import ChatMessage
from serve_app.realtime.audio import AudioFormat, Resampler
from serve_app.realtime.conversation import message_item, new_id
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


class ResponseRun:
    """Produces one response's events through ``emit``; see the module docstring."""

    def __init__(self, models: Models, plan: ResponsePlan, messages: list[ChatMessage],
                 emit: Callable[[dict[str, Any]], Awaitable[None]], request_id: str) -> None:
        self.models = models
        self.plan = plan
        self.messages = messages
        self.emit = emit
        self.id = new_id("resp")
        self.request_id = request_id
        part_type = "output_audio" if plan.audio else "output_text"
        self.part: dict[str, Any] = ({"type": part_type, "transcript": ""} if plan.audio
                                     else {"type": part_type, "text": ""})
        self.item = message_item("assistant", [self.part], "in_progress")
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
            "status_details": details, "output": [self.item] if status != "in_progress" else [],
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
        return {"response_id": self.id, "item_id": self.item["id"], "output_index": 0, "content_index": 0}

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
        await self.emit({"type": "response.created", "response": self.wire("in_progress")})
        await self.emit({"type": "response.output_item.added", "response_id": self.id,
                         "output_index": 0, "item": self.item})
        if self.plan.in_conversation:
            await self.emit({"type": "conversation.item.added", "item": self.item,
                             "previous_item_id": None})
        await self.emit({"type": "response.content_part.added", **self._where(),
                         "part": dict(self.part)})
        status, details = "completed", None
        try:
            await self._produce()
        except asyncio.CancelledError:
            status = "cancelled"
            details = {"type": "cancelled", "reason": self.cancel_reason or "client_cancelled"}
            if self.cancel_reason is None:
                raise  # not ours (the socket closed): nobody to tell
        except TroupeError as exc:
            status, details = "failed", self._failure(exc)
        except Exception as exc:  # a response always ends in response.done
            status, details = "failed", self._failure(as_troupe_error(exc))
        await self._finish(status, details)
        return self.figures

    def _failure(self, err: TroupeError) -> dict[str, Any]:
        return {"type": "failed", "error": {"type": "server_error" if err.status >= 500
                                            else "invalid_request_error",
                                            "code": err.code.lower(), "message": err.message}}

    async def _produce(self) -> None:
        plan = self.plan
        pending = ""
        async with contextlib.aclosing(self.models.generate(
                plan.trio.llm, self.messages, plan.max_tokens, plan.temperature,
                self.request_id + ":llm")) as chunks:
            async for chunk in chunks:
                if chunk.finish_reason is not None:
                    self.usage = (chunk.prompt_tokens, chunk.completion_tokens)
                else:
                    self.usage = (chunk.prompt_tokens or self.usage[0], self.usage[1] + chunk.num_tokens)
                if not chunk.text:
                    continue
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
        where = self._where()
        if self.plan.audio:
            self.part["transcript"] = self.text
            await self.emit({"type": "response.output_audio.done", **where})
            await self.emit({"type": "response.output_audio_transcript.done", **where,
                             "transcript": self.text})
        else:
            self.part["text"] = self.text
            await self.emit({"type": "response.output_text.done", **where, "text": self.text})
        await self.emit({"type": "response.content_part.done", **where, "part": dict(self.part)})
        self.item["status"] = "completed" if status == "completed" else "incomplete"
        await self.emit({"type": "response.output_item.done", "response_id": self.id,
                         "output_index": 0, "item": self.item})
        if self.plan.in_conversation:
            await self.emit({"type": "conversation.item.done", "item": self.item})
        self.figures.status = status
        self.figures.prompt_tokens, self.figures.completion_tokens = self.usage
        await self.emit({"type": "response.done", "response": self.wire(status, details)})

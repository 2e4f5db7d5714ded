"""A realtime session: client events in, server events out.

:class:`RealtimeSession` owns the session config, the input audio buffer with its turn
detector, the conversation, at most one response in progress, and the input
transcriptions. Every client event is handled in order; bad input of any kind becomes an
``error`` event that names the event and field, and the session carries on. Model work
(transcription, responses) runs in tasks, so audio keeps flowing while the models work:
that is what lets new speech interrupt an answer (barge-in).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from typing import Any, Awaitable, Callable, Optional

from pydantic import ValidationError

from serve_app.errors import InvalidRequest, TroupeError
from serve_app.protocol.realtime import (
    IGNORED_FIELDS,
    ResponseOptions,
    SessionConfig,
    first_error,
    merge,
)
from serve_app.realtime.audio import BadAudio
from serve_app.realtime.conversation import Conversation, message_item, new_id
from serve_app.realtime.input import InputBuffer
from serve_app.realtime.models import Models, RealtimeMetrics
from serve_app.realtime.responding import Responding
from serve_app.realtime.response import ResponseRun
from serve_app.realtime.vad import SpeechModel

__all__ = ["RealtimeSession", "SessionLimits"]

logger = logging.getLogger("troupe.realtime")

Emit = Callable[[dict[str, Any]], Awaitable[None]]
#: The shortest buffer a commit accepts (OpenAI's rule).
MIN_COMMIT_MS = 100


class SessionLimits:
    """Bounds of one session (from ``settings.realtime``)."""

    def __init__(self, max_buffer_s: float = 120.0, max_output_tokens: int = 1024) -> None:
        self.max_buffer_s = max_buffer_s
        self.max_output_tokens = max_output_tokens


class RealtimeSession(Responding):
    """One WebSocket's realtime conversation (see the module docstring)."""

    def __init__(self, models: Models, config: SessionConfig, emit: Emit, session_id: str,
                 limits: Optional[SessionLimits] = None, metrics: Optional[RealtimeMetrics] = None,
                 vad_model: Optional[Callable[[], SpeechModel]] = None,
                 admit: Optional[Callable[[], Awaitable[Any]]] = None) -> None:
        self.models = models
        self.emit_raw = emit
        self.id = session_id
        self.limits = limits or SessionLimits()
        self.metrics = metrics or RealtimeMetrics()
        self.vad_model = vad_model
        #: Rate limits per response: None (no limit) or (rate_limits list, finish(tokens)).
        self.admit = admit
        self.conversation = Conversation()
        self.config = config
        self.trio = models.resolve(config.model, self._asr_name(config), config.audio.output.model,
                                   config.output_modalities == ["audio"])
        self.input = InputBuffer(config.input_format, config.audio.input.turn_detection,
                                 self.limits.max_buffer_s, vad_model)
        #: Bookkeeping kept off the wire items: each answer's run, each turn's audio seconds.
        self.runs: dict[str, ResponseRun] = {}
        self.audio_seconds: dict[str, float] = {}
        self.speech_item: Optional[str] = None
        self.turn_ended_at = time.perf_counter()
        self.response: Optional[ResponseRun] = None
        self.response_task: Optional[asyncio.Task] = None
        self.last_spoken: Optional[ResponseRun] = None
        self.transcriptions: dict[str, asyncio.Task] = {}

    @staticmethod
    def _asr_name(config: SessionConfig) -> Optional[str]:
        tr = config.audio.input.transcription
        return tr.model if tr is not None else None

    # ------------------------------------------------------------------ output

    async def emit(self, event: dict[str, Any]) -> None:
        await self.emit_raw({"event_id": new_id("event"), **event})

    async def error(self, err: TroupeError, event_id: Optional[str] = None,
                    code: Optional[str] = None) -> None:
        code = code or (err.details or {}).get("realtime_code") or err.code.lower()
        kind = "invalid_request_error" if err.status < 500 else "server_error"
        await self.emit({"type": "error", "error": {
            "type": kind, "code": code, "message": err.message,
            "param": getattr(err, "param", None), "event_id": event_id}})

    async def start(self) -> None:
        await self.emit({"type": "session.created", "session": self.config.wire()})

    # ------------------------------------------------------------------ input

    async def handle(self, event: Any) -> None:
        """One client event (already parsed JSON); errors become ``error`` events."""
        event_id = event.get("event_id") if isinstance(event, dict) else None
        if not isinstance(event_id, str):
            event_id = None
        try:
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise InvalidRequest('Every client event is a JSON object with a string "type", e.g. '
                                     '{"type": "input_audio_buffer.append", "audio": "<base64>"}.',
                                     param="type")
            handler = _HANDLERS.get(event["type"])
            if handler is None:
                raise InvalidRequest(f"Unknown client event type {event['type']!r}; send one of "
                                     f"{', '.join(sorted(_HANDLERS))}.", param="type",
                                     details={"realtime_code": "invalid_event_type"})
            await handler(self, event)
        except TroupeError as err:
            await self.error(err, event_id)
        except BadAudio as exc:
            await self.error(InvalidRequest(str(exc), param="audio",
                                            details={"realtime_code": "invalid_audio"}), event_id)

    async def session_update(self, event: dict[str, Any]) -> None:
        update = event.get("session")
        if not isinstance(update, dict):
            raise InvalidRequest('session.update needs a "session" object, e.g. {"type": '
                                 '"session.update", "session": {"output_modalities": ["text"]}}.',
                                 param="session")
        if "model" in update and update["model"] != self.config.model:
            raise InvalidRequest("session.model cannot change during a session; connect again with "
                                 "?model=... to use another model.", param="session.model")
        unknown = sorted(set(update) - set(SessionConfig.model_fields) - set(IGNORED_FIELDS))
        if unknown:  # kept and echoed back, but nothing here reads them
            logger.info("realtime session %s: ignoring unknown session fields %s", self.id, unknown)
        try:
            config = SessionConfig.model_validate(merge(self.config.model_dump(mode="json"), update))
        except ValidationError as exc:
            param, message = first_error(exc, "session")
            raise InvalidRequest(message, param=param) from None
        trio = self.models.resolve(config.model, self._asr_name(config), config.audio.output.model,
                                   config.output_modalities == ["audio"])
        self.config, self.trio = config, trio
        self.input.configure(config.input_format, config.audio.input.turn_detection)
        await self.emit({"type": "session.updated", "session": config.wire()})

    async def append(self, event: dict[str, Any]) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise InvalidRequest('input_audio_buffer.append needs "audio": base64 audio in the '
                                 "session's input format.", param="audio")
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("audio is not valid base64.", param="audio",
                                 details={"realtime_code": "invalid_audio"}) from None
        for vad in self.input.append(self.config.input_format.to_pcm16(raw)):
            if vad.kind == "speech_started":
                await self._speech_started(vad.ms)
            else:
                await self._speech_stopped(vad.ms)

    async def _speech_started(self, start_ms: int) -> None:
        self.input.speech_started(start_ms)
        self.speech_item = new_id("item")
        await self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": start_ms,
                         "item_id": self.speech_item})
        td = self.config.audio.input.turn_detection
        if td is not None and td.interrupt_response:
            await self.interrupt()

    async def _speech_stopped(self, end_ms: int) -> None:
        self.turn_ended_at = time.perf_counter()
        item_id = self.speech_item or new_id("item")
        await self.emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms,
                         "item_id": item_id})
        await self._commit(item_id)
        td = self.config.audio.input.turn_detection
        if td is not None and td.create_response and self.response_task is None:
            await self._start_response(ResponseOptions())

    async def commit(self, event: dict[str, Any]) -> None:
        self.turn_ended_at = time.perf_counter()
        await self._commit(self.speech_item or new_id("item"))

    async def _commit(self, item_id: str) -> None:
        if self.trio.asr is None:
            self.input.clear()
            raise InvalidRequest("No speech-to-text model is configured, so audio cannot be "
                                 "committed; send text with conversation.item.create.",
                                 param="audio", details={"realtime_code": "no_transcription_model"})
        if self.input.ms < MIN_COMMIT_MS:
            raise InvalidRequest(
                f"The input audio buffer holds {self.input.ms} ms; a commit needs at least "
                f"{MIN_COMMIT_MS} ms of audio.", param="audio",
                details={"realtime_code": "input_audio_buffer_commit_empty"})
        rate = self.input.fmt.rate
        pcm = self.input.take()
        self.speech_item = None
        previous = self.conversation.last_id()
        item = message_item("user", [{"type": "input_audio", "transcript": None}], "completed", item_id)
        self.conversation.add(item)
        await self.emit({"type": "input_audio_buffer.committed", "previous_item_id": previous,
                         "item_id": item_id})
        await self.emit({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        self._start_transcription(item, pcm, rate)

    def _start_transcription(self, item: dict[str, Any], pcm: bytes, rate: int) -> None:
        item_id = item["id"]
        task = asyncio.create_task(self._transcribe(item, pcm, rate, len(pcm) / (2 * rate)))
        self.transcriptions[item_id] = task
        task.add_done_callback(lambda _t: self.transcriptions.pop(item_id, None))

    async def _transcribe(self, item: dict[str, Any], pcm: bytes, rate: int, seconds: float) -> None:
        tr = self.config.audio.input.transcription
        where = {"item_id": item["id"], "content_index": 0}
        assert self.trio.asr is not None  # _commit refuses audio without one
        try:
            text = await self.models.transcribe(
                self.trio.asr, pcm, rate, f"{self.id}:{item['id']}:asr",
                tr.language if tr else None, tr.prompt if tr else None)
        except TroupeError as err:
            await self.emit({"type": "conversation.item.input_audio_transcription.failed", **where,
                             "error": {"type": "transcription_error", "code": err.code.lower(),
                                       "message": err.message}})
            return
        item["content"][0]["transcript"] = text
        self.audio_seconds[item["id"]] = seconds
        await self.emit({"type": "conversation.item.input_audio_transcription.completed", **where,
                         "transcript": text, "usage": {"type": "duration", "seconds": round(seconds, 3)}})
        await self.emit({"type": "conversation.item.done", "item": item})

    async def clear(self, event: dict[str, Any]) -> None:
        self.input.clear()
        self.speech_item = None
        await self.emit({"type": "input_audio_buffer.cleared"})

    # ------------------------------------------------------------------ items

    async def item_create(self, event: dict[str, Any]) -> None:
        item = self.conversation.check_item(event.get("item"))
        previous = event.get("previous_item_id")
        if previous is not None and not isinstance(previous, str):
            raise InvalidRequest("previous_item_id must be an item id or \"root\".", param="previous_item_id")
        audio = self._item_audio(event["item"], item)
        before = self.conversation.add(item, previous)
        await self.emit({"type": "conversation.item.added", "previous_item_id": before, "item": item})
        if audio is None:
            await self.emit({"type": "conversation.item.done", "previous_item_id": before, "item": item})
            return
        rate = self.input.fmt.rate  # done follows the transcript, as for committed audio
        self._start_transcription(item, audio, rate)

    def _item_audio(self, sent: dict[str, Any], item: dict[str, Any]) -> Optional[bytes]:
        """PCM of a user item's ``input_audio`` part that came without a transcript."""
        if item["type"] != "message":
            return None
        part = sent["content"][0] if len(sent["content"]) == 1 else {}
        if item["role"] != "user" or part.get("type") != "input_audio" or part.get("transcript"):
            return None
        if not isinstance(part.get("audio"), str) or self.trio.asr is None:
            raise InvalidRequest("An input_audio part needs \"audio\" (base64, in the session's input "
                                 "format) or a \"transcript\", and audio needs a speech-to-text model.",
                                 param="item.content[0].audio")
        try:
            raw = base64.b64decode(part["audio"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidRequest("item.content[0].audio is not valid base64.",
                                 param="item.content[0].audio",
                                 details={"realtime_code": "invalid_audio"}) from None
        return self.input.fmt.to_pcm16(raw)

    async def item_delete(self, event: dict[str, Any]) -> None:
        item_id = event.get("item_id")
        if self.response is not None and item_id == self.response.item["id"]:
            raise InvalidRequest("That item is being written by the response in progress; cancel it "
                                 "first.", param="item_id")
        self.conversation.delete(item_id)
        await self.emit({"type": "conversation.item.deleted", "item_id": item_id})

    async def item_retrieve(self, event: dict[str, Any]) -> None:
        item = self.conversation.get(event.get("item_id"))
        await self.emit({"type": "conversation.item.retrieved", "item": item})

    async def item_truncate(self, event: dict[str, Any]) -> None:
        item = self.conversation.get(event.get("item_id"))
        end = event.get("audio_end_ms")
        if item.get("role") != "assistant" or item["content"][0].get("type") != "output_audio":
            raise InvalidRequest("Only an assistant message with audio can be truncated.", param="item_id")
        if event.get("content_index", 0) != 0:
            raise InvalidRequest("content_index must be 0 (an answer has one audio part).",
                                 param="content_index")
        run = self.runs.get(item["id"])
        total = run.sent_ms if run is not None else 0
        if isinstance(end, bool) or not isinstance(end, int) or not 0 <= end <= total:
            raise InvalidRequest(f"audio_end_ms must be an integer from 0 to {total} (the item's "
                                 "audio length in ms).", param="audio_end_ms")
        await self._truncate(item, end)

    async def _truncate(self, item: dict[str, Any], end_ms: int) -> None:
        run = self.runs.get(item["id"])
        if run is not None:
            item["content"][0]["transcript"] = run.heard_text(end_ms)
        await self.emit({"type": "conversation.item.truncated", "item_id": item["id"],
                         "content_index": 0, "audio_end_ms": end_ms})

    async def close(self) -> None:
        """The socket closed: stop all model work."""
        tasks = [t for t in [self.response_task, *self.transcriptions.values()] if t is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)

    async def unsupported(self, event: dict[str, Any]) -> None:
        raise InvalidRequest(f"{event['type']} is for WebRTC and SIP connections; over a WebSocket "
                             "the client owns its playback buffer.", param="type")


_HANDLERS: dict[str, Callable[[RealtimeSession, dict[str, Any]], Awaitable[None]]] = {
    "session.update": RealtimeSession.session_update,
    "input_audio_buffer.append": RealtimeSession.append,
    "input_audio_buffer.commit": RealtimeSession.commit,
    "input_audio_buffer.clear": RealtimeSession.clear,
    "conversation.item.create": RealtimeSession.item_create,
    "conversation.item.delete": RealtimeSession.item_delete,
    "conversation.item.retrieve": RealtimeSession.item_retrieve,
    "conversation.item.truncate": RealtimeSession.item_truncate,
    "response.create": RealtimeSession.response_create,
    "response.cancel": RealtimeSession.response_cancel,
    "output_audio_buffer.clear": RealtimeSession.unsupported,
}

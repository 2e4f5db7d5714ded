"""The response half of a realtime session: starting, cancelling and interrupting answers.

Mixed into :class:`serve_app.realtime.session.RealtimeSession` (it uses the session's
config, models, conversation and event output). At most one response runs at a time, as
a task; ``response.cancel`` and speech during an answer (barge-in) cancel that task, which
closes the model streams and so aborts the engines' work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, Optional

from pydantic import ValidationError

from serve_app.errors import InvalidRequest, TroupeError, as_troupe_error
from serve_app.protocol.realtime import ResponseOptions, SessionConfig, first_error, tools_of
from serve_app.realtime.conversation import Conversation
from serve_app.realtime.models import Models, RealtimeMetrics, Trio
from serve_app.realtime.response import ResponsePlan, ResponseRun

__all__ = ["Responding"]

logger = logging.getLogger("troupe.realtime")


class Responding:
    """Mixin of RealtimeSession (uses its attributes, declared here)."""

    id: str
    config: SessionConfig
    trio: Trio
    models: Models
    limits: Any
    metrics: RealtimeMetrics
    conversation: Conversation
    admit: Optional[Callable[[], Awaitable[Any]]]
    transcriptions: dict[str, asyncio.Task]
    audio_seconds: dict[str, float]
    runs: dict[str, ResponseRun]
    response: Optional[ResponseRun]
    response_task: Optional[asyncio.Task]
    last_spoken: Optional[ResponseRun]
    turn_ended_at: float
    emit: Callable[[dict[str, Any]], Awaitable[None]]
    error: Callable[..., Awaitable[None]]
    _truncate: Callable[[dict[str, Any], int], Awaitable[None]]

    async def response_create(self, event: dict[str, Any]) -> None:
        try:
            opts = ResponseOptions.model_validate(event.get("response") or {})
        except ValidationError as exc:
            param, message = first_error(exc, "response")
            raise InvalidRequest(message, param=param) from None
        if self.response_task is not None:
            raise InvalidRequest("A response is already in progress; wait for response.done or send "
                                 "response.cancel.", param="response",
                                 details={"realtime_code": "conversation_already_has_active_response"})
        self.turn_ended_at = time.perf_counter()
        await self._start_response(opts)

    async def response_cancel(self, event: dict[str, Any]) -> None:
        wanted = event.get("response_id")
        if self.response is None or (wanted is not None and wanted != self.response.id):
            raise InvalidRequest("There is no response in progress to cancel.", param="response_id",
                                 details={"realtime_code": "response_cancel_not_active"})
        await self._cancel("client_cancelled")

    async def interrupt(self) -> None:
        """New speech: stop the answer being written, truncate what was not played."""
        if self.response is None and self.response_task is not None:
            await self._cancel(reason="turn_detected")  # still waiting for the last transcript
        elif self.response is not None and self.response.plan.audio:
            run = self.response
            played = run.played_ms()
            await self._cancel("turn_detected")
            if run.plan.in_conversation and run.has_message:
                await self._truncate(run.item, played)
        elif self.response is not None:
            await self._cancel("turn_detected")
        elif self.last_spoken is not None:  # finished writing, maybe still playing
            run, self.last_spoken = self.last_spoken, None
            played = run.played_ms()
            if played < run.sent_ms and run.plan.in_conversation and run.has_message:
                await self._truncate(run.item, played)

    async def _cancel(self, reason: str) -> None:
        run, task = self.response, self.response_task
        if task is None:
            return
        if run is not None:
            run.cancel_reason = reason
        # without a run the answer had not started (it waited for the transcript): it ends
        # before response.created, so there is nothing to tell the client
        task.cancel()
        await asyncio.wait([task], timeout=5)  # its done callback (added first) has run

    def _plan(self, opts: ResponseOptions) -> ResponsePlan:
        cfg = self.config
        modalities = opts.output_modalities or cfg.output_modalities
        limit = opts.max_output_tokens or cfg.max_output_tokens
        out = cfg.audio.output
        voice = (opts.audio or {}).get("output", {}).get("voice") or out.voice
        audio = modalities == ["audio"]
        if audio and self.trio.tts is None:
            raise InvalidRequest("No text-to-speech model is configured; ask for "
                                 'output_modalities ["text"].', param="response.output_modalities")
        try:
            tools, choice = tools_of(cfg, opts)
        except ValueError as exc:
            raise InvalidRequest(f"response.tool_choice: {exc}", param="response.tool_choice") from None
        plan = ResponsePlan(
            self.trio, audio, opts.instructions if opts.instructions is not None else cfg.instructions,
            min(self.limits.max_output_tokens, limit) if isinstance(limit, int) else self.limits.max_output_tokens,
            0.0 if cfg.temperature is None else cfg.temperature, voice, out.speed, cfg.output_format,
            opts.conversation == "auto", opts.metadata, self.turn_ended_at)
        plan.tools, plan.tool_choice = tools, choice
        plan.parallel_tool_calls = cfg.parallel_tool_calls is not False
        return plan

    async def _start_response(self, opts: ResponseOptions) -> None:
        plan = self._plan(opts)
        extra = [self.conversation.check_item(i) for i in opts.input or []]
        admitted = await self.admit() if self.admit is not None else None
        finish: Optional[Callable[[int], None]] = None
        if admitted is not None:
            rate_limits, finish = admitted
            if rate_limits:
                await self.emit({"type": "rate_limits.updated", "rate_limits": rate_limits})
        task = asyncio.create_task(self._respond(plan, extra))
        self.response_task = task

        def ended(_: asyncio.Task) -> None:
            # here, not in _respond's finally: a task cancelled before it ran has none
            run = self.response
            if self.response_task is task:
                self.response, self.response_task = None, None
            if finish is not None:  # charge the answer's tokens to the key's limits
                finish(sum(run.usage) if run is not None else 0)

        task.add_done_callback(ended)

    async def _respond(self, plan: ResponsePlan, extra: list[dict[str, Any]]) -> None:
        try:
            if self.transcriptions:  # the answer needs the words of the turn
                await asyncio.wait(list(self.transcriptions.values()))
            convo = self.conversation if plan.in_conversation else Conversation()
            for item in extra:
                convo.add(item)
            # audio heard since the last answer (each turn's seconds are counted once)
            plan.audio_in_s = sum(self.audio_seconds.pop(i["id"], 0.0) for i in convo.items)
            run = ResponseRun(self.models, plan, convo.messages(plan.instructions), self.emit,
                              f"{self.id}:{len(self.runs)}",  # unique in the session: a ledger row each
                              self.conversation.add if plan.in_conversation else None)
            self.response = run
            self.runs[run.item["id"]] = run
            figures = await run.run()
            self.metrics.record(figures)
            if plan.audio:
                self.last_spoken = run
        except TroupeError as err:
            await self.error(err)
        except Exception as exc:  # the session outlives a failed response
            logger.exception("realtime response failed")
            await self.error(as_troupe_error(exc))

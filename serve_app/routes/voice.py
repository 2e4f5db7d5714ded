"""``POST /voice/pipeline``: audio in; transcript, reply text and reply audio out.

Thin: read the body -> check -> :func:`serve_app.gateway.voice.voice_events` (the pipeline
over three models) -> one JSON answer with the reply as a WAV file (base64).
"""

from __future__ import annotations

import base64
from typing import Any, Optional

from fastapi import APIRouter, Request

from serve_app.errors import InvalidRequest, RequestTooLarge
from serve_app.gateway.voice import (
    PIPELINE_EXAMPLE,
    VoiceOptions,
    voice_events,
    wav_from_pcm,
)
from serve_app.http.plumbing import JSONResponse, request_id_of

__all__ = ["build_voice_router"]


def build_voice_router(core: Any) -> APIRouter:
    router = APIRouter()
    max_body = core.settings.gateway.max_body_bytes

    @router.post("/voice/pipeline")
    async def pipeline(request: Request, asr: Optional[str] = None, llm: Optional[str] = None,
                       tts: Optional[str] = None, voice: str = "alloy", max_tokens: int = 96) -> JSONResponse:
        """Binary audio body in; transcript, reply text and reply audio (WAV, base64) out."""
        audio = await request.body()
        if len(audio) > max_body:
            raise RequestTooLarge(f"The audio is {len(audio)} bytes; at most {max_body} are accepted.",
                                  details={"max_bytes": max_body})
        if not audio:
            raise InvalidRequest(f"The request body is empty: send the audio file as the body, e.g. {PIPELINE_EXAMPLE}",
                                 param="audio")
        opts = VoiceOptions(asr, llm, tts, voice, max_tokens).resolved(core, "POST /voice/pipeline")
        pcm = bytearray()
        rate = 0
        complete: dict[str, Any] = {}
        async for kind, value in voice_events(core, audio, "upload", opts, request_id_of(request),
                                              "/voice/pipeline"):
            if kind == "audio.start":
                rate = value["sample_rate"]
            elif kind == "audio":
                pcm += value
            elif kind == "complete":
                complete = value
        return JSONResponse({
            **complete,
            "audio_format": "wav",
            "sample_rate": rate,
            "audio": base64.b64encode(wav_from_pcm(bytes(pcm), rate or 22050)).decode(),
            "request_id": request_id_of(request),
        })

    return router

"""Routes of the non-text modalities and of model load/unload.

OpenAI-compatible: ``POST /v1/embeddings``, ``POST /v1/audio/speech`` (streamed audio),
``GET /v1/audio/voices``, ``POST /v1/audio/transcriptions`` (multipart),
``POST /v1/images/generations``. Native: ``POST /embeddings``,
``POST /models/{id}/load``, ``POST /models/{id}/unload``.

Thin: parse -> check -> one GatewayCore call -> encode.
"""

from __future__ import annotations

import base64
import time
from typing import Any, AsyncGenerator, Optional

import numpy as np
from fastapi import APIRouter, Request
from starlette.responses import PlainTextResponse, StreamingResponse

from serve_app.errors import InvalidRequest, RequestTooLarge
from serve_app.gateway.core import GatewayCore
from serve_app.gateway.metering import RequestInfo
from serve_app.http.plumbing import JSONResponse, parse_body, read_json, request_id_of
from serve_app.protocol.modalities import (
    AUDIO_FORMATS,
    AUDIO_MEDIA_TYPES,
    AudioChunk,
    EmbeddingRequest,
    ImageRequest,
    SpeechRequest,
    TranscriptionRequest,
    TranscriptionResult,
)
from serve_app.protocol.modalities_api import (
    EMBEDDINGS_EXAMPLE,
    IMAGE_EXAMPLE,
    SPEECH_EXAMPLE,
    TRANSCRIPTION_FORMATS,
    EmbeddingsBody,
    ImageBody,
    SpeechBody,
    parse_size,
)
from serve_app.protocol.openai import unknown_fields
from serve_app.settings.modality import image_sizes

__all__ = ["build_modalities_router", "subtitles"]

TRANSCRIBE_EXAMPLE = (
    "multipart form fields model=whisper-tiny-en, file=@speech.wav, response_format=json"
)


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def subtitles(result: TranscriptionResult, fmt: str) -> str:
    """SRT or WebVTT cues, one per segment."""
    if fmt == "srt":
        return "".join(
            f"{i}\n{_timestamp(s.start, ',')} --> {_timestamp(s.end, ',')}\n{s.text.strip()}\n\n"
            for i, s in enumerate(result.segments, 1)
        )
    return "WEBVTT\n\n" + "".join(
        f"{_timestamp(s.start, '.')} --> {_timestamp(s.end, '.')}\n{s.text.strip()}\n\n"
        for s in result.segments
    )


def _embedding_payload(result: Any, encoding: str) -> list[dict[str, Any]]:
    data = []
    for i, raw in enumerate(result.vectors):
        if encoding == "base64":
            value: Any = base64.b64encode(raw).decode()
        else:
            value = np.frombuffer(raw, dtype="<f4").tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    return data


async def _audio_bytes(first: AudioChunk, rest: AsyncGenerator[AudioChunk, None]) -> AsyncGenerator[bytes, None]:
    try:
        if first.data:
            yield first.data
        async for chunk in rest:
            if chunk.data:
                yield chunk.data
    finally:
        await rest.aclose()


async def _peek(chunks: AsyncGenerator[AudioChunk, None]) -> tuple[AudioChunk, AsyncGenerator[AudioChunk, None]]:
    """Await the first chunk so early errors (bad voice, empty input) get a real status."""
    try:
        first = await chunks.__anext__()
    except BaseException:
        await chunks.aclose()
        raise
    return first, chunks


def build_modalities_router(core: GatewayCore) -> APIRouter:
    """The modality and load/unload routes, closed over one GatewayCore."""
    router = APIRouter()
    max_body = core.settings.gateway.max_body_bytes
    _add_embedding_routes(router, core, max_body)
    _add_speech_routes(router, core, max_body)
    _add_transcription_route(router, core, max_body)
    _add_image_route(router, core, max_body)

    # Admin-only: the policy layer (serve_app/policies/layer.py) classifies
    # POST /models/{id}/load|unload as admin routes, so only admin keys reach them.
    @router.post("/models/{model_id:path}/unload")
    async def unload(model_id: str) -> JSONResponse:
        return JSONResponse(await core.unload_model(model_id))

    @router.post("/models/{model_id:path}/load")
    async def load(model_id: str) -> JSONResponse:
        return JSONResponse(await core.load_model(model_id))

    return router


# ----------------------------------------------------------------- embeddings


def _add_embedding_routes(router: APIRouter, core: GatewayCore, max_body: int) -> None:
    """``POST /v1/embeddings`` (OpenAI) and ``POST /embeddings`` (native)."""

    async def _embed(request: Request, route: str) -> tuple[EmbeddingsBody, Any, str]:
        body = parse_body(
            EmbeddingsBody, await read_json(request, max_body, EMBEDDINGS_EXAMPLE), EMBEDDINGS_EXAMPLE
        )
        core.note_unknown_fields(route, unknown_fields(body))
        core.admit(body.model, "embeddings", f"POST {route}")
        request_id = request_id_of(request)
        req = EmbeddingRequest(request_id, body.inputs(), body.dimensions)
        result = await core.embed(body.model, req, RequestInfo(route))
        return body, result, request_id

    @router.post("/v1/embeddings")
    async def openai_embeddings(request: Request) -> JSONResponse:
        body, result, _ = await _embed(request, "/v1/embeddings")
        return JSONResponse({
            "object": "list",
            "data": _embedding_payload(result, body.encoding_format),
            "model": body.model,
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
        })

    @router.post("/embeddings")
    async def native_embeddings(request: Request) -> JSONResponse:
        body, result, request_id = await _embed(request, "/embeddings")
        return JSONResponse({
            "model": body.model,
            "dimensions": result.dimensions,
            "data": _embedding_payload(result, body.encoding_format),
            "usage": {"prompt_tokens": result.prompt_tokens, "total_tokens": result.prompt_tokens},
            "request_id": request_id,
        })


# --------------------------------------------------------------------- speech


def _add_speech_routes(router: APIRouter, core: GatewayCore, max_body: int) -> None:
    """``POST /v1/audio/speech`` (streamed audio) and ``GET /v1/audio/voices``."""

    @router.post("/v1/audio/speech")
    async def speech(request: Request) -> StreamingResponse:
        body = parse_body(SpeechBody, await read_json(request, max_body, SPEECH_EXAMPLE), SPEECH_EXAMPLE)
        core.note_unknown_fields("/v1/audio/speech", unknown_fields(body))
        core.admit(body.model, "speech", "POST /v1/audio/speech")
        if body.response_format not in AUDIO_FORMATS:
            raise InvalidRequest(
                f"response_format {body.response_format!r} is not supported; use one of "
                f"{', '.join(AUDIO_FORMATS)}. Example: {SPEECH_EXAMPLE}",
                param="response_format",
            )
        req = SpeechRequest(request_id_of(request), body.input, body.voice, body.response_format, body.speed)
        first, rest = await _peek(core.speak(body.model, req, RequestInfo("/v1/audio/speech", True)))
        headers = {"x-sample-rate": str(first.sample_rate)} if first.sample_rate else {}
        return StreamingResponse(
            _audio_bytes(first, rest), media_type=AUDIO_MEDIA_TYPES[body.response_format], headers=headers
        )

    @router.get("/v1/audio/voices")
    async def voices(model: Optional[str] = None) -> JSONResponse:
        ids = [model] if model else [m.id for m in core.models.values() if m.modality == "speech"]
        out = []
        for model_id in ids:
            core.admit(model_id, "speech", "GET /v1/audio/voices")
            info = await core.voices(model_id)
            out.append({"model": model_id, **info})
        return JSONResponse({"object": "list", "data": out})


# -------------------------------------------------------------- transcription


def _add_transcription_route(router: APIRouter, core: GatewayCore, max_body: int) -> None:
    """``POST /v1/audio/transcriptions`` (multipart upload)."""

    @router.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request):
        form = await _transcription_form(request, max_body)
        model_id = str(form.get("model") or "")
        upload = form.get("file")
        if not model_id:
            raise InvalidRequest(f"model is required: {TRANSCRIBE_EXAMPLE}.", param="model")
        if upload is None or isinstance(upload, str):
            raise InvalidRequest(f"file is required (an audio upload): {TRANSCRIBE_EXAMPLE}.", param="file")
        fmt = str(form.get("response_format") or "json")
        if fmt not in TRANSCRIPTION_FORMATS:
            raise InvalidRequest(
                f"response_format {fmt!r} is not supported; use one of {', '.join(TRANSCRIPTION_FORMATS)}.",
                param="response_format",
            )
        try:
            temperature = float(form.get("temperature") or 0.0)
        except ValueError:
            raise InvalidRequest("temperature must be a number from 0 to 1.", param="temperature") from None
        known = {"model", "file", "response_format", "temperature", "language", "prompt"}
        core.note_unknown_fields("/v1/audio/transcriptions", sorted(set(form.keys()) - known))
        core.admit(model_id, "transcription", "POST /v1/audio/transcriptions")
        audio = await upload.read()
        if not audio:
            raise InvalidRequest(f"The uploaded file is empty. Send {TRANSCRIBE_EXAMPLE}.", param="file")
        req = TranscriptionRequest(
            request_id_of(request), audio, upload.filename or "",
            str(form.get("language") or "") or None, str(form.get("prompt") or "") or None, temperature,
        )
        result = await core.transcribe(model_id, req, RequestInfo("/v1/audio/transcriptions"))
        return _transcription_response(result, fmt, temperature)


async def _transcription_form(request: Request, max_body: int) -> Any:
    """The upload's multipart form, refused when too large or not multipart."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body:
        raise RequestTooLarge(
            f"The upload is {length} bytes; this gateway accepts at most {max_body}.",
            details={"max_bytes": max_body},
        )
    raw = await request.body()  # cached: form() below parses these bytes
    if len(raw) > max_body:
        raise RequestTooLarge(
            f"The upload is {len(raw)} bytes; this gateway accepts at most {max_body}.",
            details={"max_bytes": max_body},
        )
    if "multipart/form-data" not in request.headers.get("content-type", ""):
        raise InvalidRequest(
            f"Send the audio as multipart/form-data: {TRANSCRIBE_EXAMPLE}.", param="file"
        )
    try:
        return await request.form()
    except Exception:  # malformed multipart bodies raise several parser errors
        raise InvalidRequest(
            f"The multipart body could not be parsed. Send {TRANSCRIBE_EXAMPLE}.", param="file"
        ) from None


def _transcription_response(result: TranscriptionResult, fmt: str, temperature: float) -> Any:
    """The transcription in ``fmt``: text, srt, vtt, json or verbose_json."""
    if fmt == "text":
        return PlainTextResponse(result.text + "\n")
    if fmt in ("srt", "vtt"):
        return PlainTextResponse(subtitles(result, fmt), media_type="text/vtt" if fmt == "vtt" else "text/plain")
    if fmt == "json":
        return JSONResponse({"text": result.text, "usage": {"type": "duration", "seconds": round(result.duration)}})
    return JSONResponse({
        "task": "transcribe",
        "language": result.language,
        "duration": result.duration,
        "text": result.text,
        "segments": [
            {"id": s.id, "seek": s.seek, "start": s.start, "end": s.end, "text": s.text,
             "tokens": s.tokens,
             "temperature": temperature if s.temperature is None else s.temperature,
             "avg_logprob": s.avg_logprob, "compression_ratio": s.compression_ratio,
             "no_speech_prob": s.no_speech_prob}
            for s in result.segments
        ],
    })


# ---------------------------------------------------------------------- image


def _add_image_route(router: APIRouter, core: GatewayCore, max_body: int) -> None:
    """``POST /v1/images/generations`` (images inline, base64 PNG)."""

    @router.post("/v1/images/generations")
    async def images(request: Request) -> JSONResponse:
        body = parse_body(ImageBody, await read_json(request, max_body, IMAGE_EXAMPLE), IMAGE_EXAMPLE)
        core.note_unknown_fields("/v1/images/generations", unknown_fields(body))
        model_id = body.model or next(
            (m.id for m in core.models.values() if m.modality == "image"), ""
        )
        if not model_id:
            raise InvalidRequest("No image model is configured here; see GET /models.", param="model")
        model = core.admit(model_id, "image", "POST /v1/images/generations")
        if body.response_format != "b64_json":
            raise InvalidRequest(
                f"response_format {body.response_format!r} is not supported: this gateway "
                f"returns images inline only. Send \"response_format\": \"b64_json\". Example: {IMAGE_EXAMPLE}",
                param="response_format",
            )
        offered = image_sizes(model.engine)
        size = body.size or offered[0]
        wh = parse_size(size)
        if wh is None or size not in offered:
            raise InvalidRequest(
                f"size {size!r} is not offered by model {model_id!r}; use one of {', '.join(offered)}. "
                f"Example: {IMAGE_EXAMPLE}",
                param="size",
            )
        if not 1 <= body.n <= 10:
            raise InvalidRequest(f"n={body.n} is out of range: ask for 1 to 10 images.", param="n")
        req = ImageRequest(request_id_of(request), body.prompt, body.n, wh[0], wh[1], body.seed)
        result = await core.generate_images(model_id, req, RequestInfo("/v1/images/generations"))
        return JSONResponse({
            "created": int(time.time()),
            "data": [{"b64_json": base64.b64encode(png).decode(), "revised_prompt": None}
                     for png in result.images],
            "size": size,
            "output_format": "png",
        })

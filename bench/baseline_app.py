"""The "bare Ray Serve" baseline: the same topology as Troupe with nothing on top.

client -> Serve proxy -> ``BaselineIngress`` (FastAPI) -> DeploymentHandle -> ``BaselineModel``
(holding the very :class:`~deployments.engines.mock.MockTextEngine` Troupe uses).

It is deliberately minimal: no validation, no policies, no error mapping; SSE chunks are
framed with ``json.dumps``. Whatever Troupe costs beyond this is the price of its features.
Deployed by ``bench.run_bench`` as application ``baseline`` under ``/baseline``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments.engines.mock import MockTextEngine
from serve_app.settings import MockEngineConfig
from serve_app.protocol.internal import (
    ChatMessage,
    EngineOutput,
    GenerationRequest,
    SamplingParams,
)

__all__ = [
    "BASELINE_APP_NAME",
    "BASELINE_ROUTE_PREFIX",
    "BASELINE_MODEL_ID",
    "BaselineModel",
    "BaselineIngress",
    "build_baseline_fastapi",
    "build_baseline_app",
]

BASELINE_APP_NAME = "baseline"
BASELINE_ROUTE_PREFIX = "/baseline"
BASELINE_MODEL_ID = "mock-5ms"


class BaselineModel:
    """Model deployment: streams the mock engine's deltas as they are."""

    def __init__(self, token_delay_ms: float = 5.0) -> None:
        self.engine = MockTextEngine(
            BASELINE_MODEL_ID, MockEngineConfig(token_delay_ms=token_delay_ms, ignore_eos=True)
        )

    async def stream(self, request: GenerationRequest) -> AsyncIterator[EngineOutput]:
        async for out in self.engine.generate(request):
            yield out

    async def complete(self, request: GenerationRequest) -> dict[str, Any]:
        parts: list[str] = []
        completion = prompt_tokens = 0
        finish = None
        async for out in self.engine.generate(request):
            parts.append(out.text)
            completion += out.num_tokens
            prompt_tokens = out.prompt_tokens
            finish = out.finish_reason
        return {
            "text": "".join(parts),
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "finish_reason": finish,
        }


def _generation_request(body: dict[str, Any]) -> GenerationRequest:
    messages = [ChatMessage(m["role"], m["content"]) for m in body["messages"]]
    sampling = SamplingParams(
        max_tokens=body.get("max_tokens"), temperature=body.get("temperature", 1.0)
    )
    return GenerationRequest(uuid.uuid4().hex, sampling=sampling, messages=messages)


def _sse(data: dict[str, Any]) -> str:
    return "data: " + json.dumps(data) + "\n\n"


async def _sse_stream(
    outputs: AsyncIterator[EngineOutput], request_id: str, model: str, include_usage: bool
) -> AsyncIterator[str]:
    head = {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
    }
    yield _sse({**head, "choices": [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]})
    completion = prompt_tokens = 0
    async for out in outputs:
        completion += out.num_tokens
        prompt_tokens = out.prompt_tokens
        delta = {"content": out.text} if out.text else {}
        yield _sse({**head, "choices": [
            {"index": 0, "delta": delta, "finish_reason": out.finish_reason}
        ]})
    if include_usage:
        yield _sse({**head, "choices": [], "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
        }})
    yield "data: [DONE]\n\n"


def build_baseline_fastapi(model: DeploymentHandle) -> FastAPI:
    """The ingress's FastAPI app (built per replica, never at import)."""
    app = FastAPI()
    stream_handle = model.options(method_name="stream", stream=True)
    complete_handle = model.options(method_name="complete")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await request.json()
        gen = _generation_request(body)
        model_name = body.get("model", BASELINE_MODEL_ID)
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(
                _sse_stream(stream_handle.remote(gen), gen.request_id, model_name, include_usage),
                media_type="text/event-stream",
            )
        out = await complete_handle.remote(gen)
        return JSONResponse({
            "id": gen.request_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model_name,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": out["text"]},
                "finish_reason": out["finish_reason"],
            }],
            "usage": {
                "prompt_tokens": out["prompt_tokens"],
                "completion_tokens": out["completion_tokens"],
                "total_tokens": out["prompt_tokens"] + out["completion_tokens"],
            },
        })

    return app


class BaselineIngress:
    """Ingress deployment; Serve calls ``__serve_build_asgi_app__`` after ``__init__``."""

    def __init__(self, model: DeploymentHandle) -> None:
        self._model = model

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_baseline_fastapi(self._model)


def build_baseline_app(
    *,
    token_delay_ms: float = 5.0,
    ingress_num_cpus: float = 0.5,
    model_num_cpus: float = 0.5,
    ingress_max_ongoing_requests: int = 1000,
    model_max_ongoing_requests: int = 64,
):
    """The bound Serve application (deploy with ``serve.run(..., name="baseline")``).

    The defaults mirror Troupe's benchmark config (gateway/model resources and caps).
    """
    model = serve.deployment(
        BaselineModel,
        name="BaselineModel",
        num_replicas=1,
        max_ongoing_requests=model_max_ongoing_requests,
        ray_actor_options={"num_cpus": model_num_cpus},
    )
    ingress = serve.deployment(
        serve.ingress()(BaselineIngress),
        name="BaselineIngress",
        num_replicas=1,
        max_ongoing_requests=ingress_max_ongoing_requests,
        ray_actor_options={"num_cpus": ingress_num_cpus},
    )
    return ingress.bind(model.bind(token_delay_ms))

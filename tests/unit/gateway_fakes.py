"""Fake model handles and helpers for driving the gateway app in-process.


The fake handles run a real :class:`LLMDeployment` (mock engine) in this process and keep
the parts of Ray's handle contract the gateway relies on: a call returns at once; the
replica's work runs on its own (so cancelling the caller does not cancel it, only
``.cancel()`` does); requests, chunks and errors cross the "wire" pickled.
"""
from __future__ import annotations

import asyncio
import json
import pickle
import time
from typing import Any, AsyncIterator, Callable, Optional

import httpx
import pytest

from deployments.llm import LLMDeployment
from serve_app.build.app import build_fastapi_app
from serve_app.settings import TroupeSettings, load_settings
from serve_app.gateway.core import GatewayCore

# Every HTTP exchange gets this deadline, so an SSE response that never ends fails the
# test instead of hanging the suite.
REQUEST_DEADLINE_S = 10.0


# ------------------------------------------------------------------ fake handles


def _over_the_wire(obj: Any) -> Any:
    """What Ray does to arguments, results and exceptions: a pickle round trip."""
    return pickle.loads(pickle.dumps(obj))


class FakeResponse:
    """Like a DeploymentResponse: awaitable, and ``cancel()`` stops the replica's work."""

    def __init__(self, work: Any) -> None:
        self._task = asyncio.ensure_future(work)
        self.cancelled = False

    def __await__(self):
        # shield: cancelling the awaiting task does not cancel the remote work (as in Ray).
        return asyncio.shield(self._task).__await__()

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()


class FakeResponseGenerator:
    """Like a DeploymentResponseGenerator: the replica's generator runs on its own task."""

    _END = object()

    def __init__(self, chunks: AsyncIterator[Any], reader_delay_s: float = 0.0) -> None:
        self._queue: asyncio.Queue = asyncio.Queue()
        self._reader_delay_s = reader_delay_s
        self._task = asyncio.ensure_future(self._pump(chunks))
        self.cancelled = False

    async def _pump(self, chunks: AsyncIterator[Any]) -> None:
        try:
            async for chunk in chunks:
                self._queue.put_nowait(("chunk", _over_the_wire(chunk)))
                if self._reader_delay_s:
                    # Simulates a slow link to the replica: the engine runs ahead and
                    # merges tokens into bigger deltas (not a synchronization sleep).
                    await asyncio.sleep(self._reader_delay_s)
            self._queue.put_nowait(("end", None))
        except asyncio.CancelledError:
            self._queue.put_nowait(("error", asyncio.CancelledError()))
            raise
        except Exception as exc:
            self._queue.put_nowait(("error", _over_the_wire(exc)))
        finally:
            await chunks.aclose()

    def __aiter__(self) -> "FakeResponseGenerator":
        return self

    async def __anext__(self) -> Any:
        kind, value = await self._queue.get()
        if kind == "end":
            raise StopAsyncIteration
        if kind == "error":
            raise value
        return value

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()


class FailingResponseGenerator:
    """A stream whose remote call failed in Ray itself (queue full, replica gone, ...)."""

    def __init__(self, exc: BaseException) -> None:
        self._exc = exc
        self.cancelled = False

    def __aiter__(self) -> "FailingResponseGenerator":
        return self

    async def __anext__(self) -> Any:
        raise self._exc

    def cancel(self) -> None:
        self.cancelled = True


class _Method:
    def __init__(self, call: Callable[..., Any]) -> None:
        self.remote = call


class FakeReplica:
    """What both views of a handle (plain and ``stream=True``) share: the replica."""

    def __init__(self, deployment: LLMDeployment, reader_delay_s: float = 0.0) -> None:
        self.deployment = deployment
        #: Delay after each streamed chunk on its way to the gateway (a slow link).
        self.reader_delay_s = reader_delay_s
        #: Every response/generator handed out, to check what the gateway cancelled.
        self.responses: list[Any] = []
        #: When set, ``stats`` fails with it (a dead replica); "hang" never answers.
        self.stats_failure: Any = None
        #: When set, ``complete``/``stream`` calls fail with it, as Ray raises it.
        self.call_failure: Optional[BaseException] = None


class FakeHandle:
    """A model deployment handle over an in-process LLMDeployment."""

    def __init__(self, replica: FakeReplica, stream: bool = False) -> None:
        self.replica = replica
        self._stream = stream

    def options(self, *, stream: bool = False) -> "FakeHandle":
        return FakeHandle(self.replica, stream)

    def _record(self, response: Any) -> Any:
        self.replica.responses.append(response)
        return response

    @property
    def stream(self) -> _Method:
        assert self._stream, "stream() needs .options(stream=True), as on a real handle"
        replica = self.replica

        def call(req: Any) -> Any:
            if replica.call_failure is not None:
                return self._record(FailingResponseGenerator(replica.call_failure))
            return self._record(
                FakeResponseGenerator(
                    replica.deployment.stream(_over_the_wire(req)), replica.reader_delay_s
                )
            )

        return _Method(call)

    @property
    def complete(self) -> _Method:
        async def call(req: Any) -> Any:
            if self.replica.call_failure is not None:
                raise self.replica.call_failure
            try:
                return _over_the_wire(await self.replica.deployment.complete(req))
            except Exception as exc:
                raise _over_the_wire(exc) from None

        return _Method(lambda req: self._record(FakeResponse(call(_over_the_wire(req)))))

    @property
    def stats(self) -> _Method:
        async def call() -> dict[str, Any]:
            failure = self.replica.stats_failure
            if failure == "hang":
                await asyncio.Event().wait()  # never set: a replica that does not answer
            if failure is not None:
                raise failure
            return _over_the_wire(self.replica.deployment.stats())

        return _Method(lambda: FakeResponse(call()))


# ----------------------------------------------------------------------- fixtures


MODELS = [
    {"id": "mock-fast", "engine": {"type": "mock", "token_delay_ms": 0}, "default_max_tokens": 64},
    {
        "id": "mock-slow",
        "engine": {"type": "mock", "token_delay_ms": 5, "ignore_eos": True},
        "default_max_tokens": 2000,
    },
    {
        "id": "mock-broken",
        "engine": {"type": "mock", "token_delay_ms": 0, "ignore_eos": True, "fail_after_tokens": 2},
    },
    {
        "id": "mock-dead",
        "engine": {"type": "mock", "token_delay_ms": 0, "fail_after_tokens": 0},
    },
    {
        # Read through a slow link (see FakeResponseGenerator), so deltas merge tokens.
        "id": "mock-merge",
        "engine": {"type": "mock", "token_delay_ms": 2, "ignore_eos": True},
    },
    {"id": "org/mock", "engine": {"type": "mock", "token_delay_ms": 0}},
]
READER_DELAY_S = {"mock-merge": 0.01}
MAX_BODY = 2048


class GatewayUnderTest:
    """The app under test plus the deployments behind it."""

    def __init__(self, settings: TroupeSettings) -> None:
        self.deployments = {m.id: LLMDeployment(m) for m in settings.models}
        self.replicas = {
            mid: FakeReplica(dep, READER_DELAY_S.get(mid, 0.0))
            for mid, dep in self.deployments.items()
        }
        self.handles = {mid: FakeHandle(replica) for mid, replica in self.replicas.items()}
        self.core = GatewayCore(settings, self.handles)
        self.app = build_fastapi_app(self.core)
        self.client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=self.app), base_url="http://troupe.test"
        )

    def active(self, model_id: str) -> int:
        return self.deployments[model_id].engine.active_requests()

    async def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        async with asyncio.timeout(REQUEST_DEADLINE_S):
            return await self.client.request(method, url, **kwargs)

    async def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("POST", url, **kwargs)

    async def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return await self.request("GET", url, **kwargs)


def make_gateway(**gateway_options: Any) -> GatewayUnderTest:
    return GatewayUnderTest(
        load_settings(
            {
                "models": MODELS,
                "gateway": {"max_body_bytes": MAX_BODY, "health_timeout_s": 0.2, **gateway_options},
                "log_unknown_fields": True,
            }
        )
    )


@pytest.fixture
async def gw() -> AsyncIterator[GatewayUnderTest]:
    gateway = make_gateway()
    try:
        yield gateway
    finally:
        await gateway.client.aclose()


async def eventually(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def sse_events(response: httpx.Response) -> list[dict[str, Optional[str]]]:
    """Parse an SSE body into events: ``{"event": name or None, "data": str}``."""
    events = []
    for block in response.text.replace("\r\n", "\n").split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        event: Optional[str] = None
        data: list[str] = []
        for line in lines:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
        events.append({"event": event, "data": "\n".join(data)})
    return events


def sse_json(response: httpx.Response) -> tuple[list[Any], list[str]]:
    """The JSON payloads of an OpenAI-style stream and the raw data of each event."""
    raw = [e["data"] for e in sse_events(response)]
    return [json.loads(d) for d in raw if d != "[DONE]"], raw


def chat_body(content: str = "Hello", **extra: Any) -> dict[str, Any]:
    return {"model": "mock-fast", "messages": [{"role": "user", "content": content}], **extra}


def assert_openai_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert err["code"] == code
    assert err["type"]
    assert err["message"]
    assert "param" in err
    assert err["request_id"] == response.headers["x-request-id"]
    return err


def assert_native_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "request_id", "timestamp"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert isinstance(body["error"]["details"], dict)
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["timestamp"].endswith("Z")
    return body



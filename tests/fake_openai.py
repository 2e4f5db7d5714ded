"""A fake OpenAI chat completions server: a real aiohttp app on 127.0.0.1 (random port).

It speaks the wire format the remote engine talks to, errors and SSE included, so tests
exercise the real HTTP client path instead of mocks::

    with FakeOpenAI() as fake:                        # sync tests: runs in its own thread
        fake.configure(token_delay_s=0.01, reply_tokens=6)
        ... point OpenAIEngineConfig(base_url=fake.url, ...) at it ...
        assert fake.requests[-1].body["stream"] is True

    async with FakeOpenAI() as fake:                  # async tests: runs on the test's loop
        ...

Routes: ``POST /v1/chat/completions`` (streaming SSE and non-streaming JSON) and
``GET /v1/models``. The reply is deterministic: :func:`reply_tokens` of the last message
(or :attr:`Behaviour.reply_text`), cut to ``max_tokens`` (then ``finish_reason`` is
``length``). Usage: :func:`prompt_tokens_for` of the messages, and one completion token
per reply word.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from aiohttp import web

from tests.fake_agent import TOOL_CALL_TOKENS, read_openai, words

__all__ = [
    "FakeOpenAI",
    "Behaviour",
    "RecordedRequest",
    "reply_tokens",
    "prompt_tokens_for",
    "fake_embedding",
]

_VOCAB = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def reply_tokens(prompt: str, count: Optional[int] = None) -> list[str]:
    """The fake's reply to ``prompt`` as tokens (the first bare, the rest with a leading space)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    if count is None:
        count = 4 + digest[0] % 5  # 4..8 words
    words = [_VOCAB[(digest[i % 32] + i) % len(_VOCAB)] for i in range(count)]
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def fake_embedding(text: str, dims: int = 8) -> list[float]:
    """The fake's deterministic embedding of ``text``."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round((digest[i] - 128) / 128, 6) for i in range(dims)]


def prompt_tokens_for(messages: list[dict[str, Any]]) -> int:
    """The fake's prompt token count: words of every message plus 3 per message."""
    return sum(len(str(m.get("content", "")).split()) + 3 for m in messages)


@dataclass
class Behaviour:
    """How the fake answers; set with :meth:`FakeOpenAI.configure` or :meth:`enqueue`."""

    #: Words in the reply (None: 4..8, derived from the prompt).
    reply_tokens: Optional[int] = None
    #: Exact reply text (split on spaces into tokens); overrides reply_tokens.
    reply_text: Optional[str] = None
    #: Tokens per SSE content chunk (>1 makes the chunk count differ from usage).
    tokens_per_chunk: int = 1
    #: Delay before each content chunk.
    token_delay_s: float = 0.0
    #: Delay before the response headers (a slow first byte with nothing sent at all).
    headers_delay_s: float = 0.0
    #: Send headers (+ role chunk when > 0) and this many content chunks, then hang open.
    stall_after_chunks: Optional[int] = None
    #: Answer with this HTTP status and an OpenAI error body instead of a completion.
    status: int = 200
    #: ``error.code`` of that body (defaults per status, e.g. 400 context_length_exceeded).
    error_code: Optional[str] = None
    error_message: Optional[str] = None
    #: ``Retry-After`` header of an error answer (e.g. "7").
    retry_after: Optional[str] = None
    #: After this many content chunks send ``data: {"error": {...}}`` and end the stream.
    error_after_chunks: Optional[int] = None
    #: After this many content chunks drop the TCP connection (no finish, no [DONE]).
    disconnect_after_chunks: Optional[int] = None
    #: Send the usage chunk when the client asks (``stream_options.include_usage``).
    send_usage: bool = True
    #: Send ``data: [DONE]`` at the end.
    send_done: bool = True
    #: When set, requests whose bearer token differs get a 401.
    expected_api_key: Optional[str] = None
    #: Override the final finish_reason (e.g. "content_filter").
    finish_reason: Optional[str] = None
    #: Extra delay before the headers of a request with ``service_tier: "flex"``.
    flex_headers_delay_s: float = 0.0
    #: Prompt tokens reported as served from the provider's prompt cache.
    cached_tokens: int = 0


_DEFAULT_ERRORS = {
    400: ("invalid_request_error", "context_length_exceeded", "This model's maximum context "
          "length is 8192 tokens. However, your messages resulted in 9000 tokens."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided: {key}."),
    403: ("invalid_request_error", "unsupported_country_region_territory",
          "Country, region, or territory not supported."),
    404: ("invalid_request_error", "model_not_found", "The model `{model}` does not exist."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
}


@dataclass
class RecordedRequest:
    """One request the fake received."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    received_at: float = field(default_factory=time.monotonic)

    @property
    def api_key(self) -> Optional[str]:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[len("Bearer "):]
        return self.headers.get("api-key")  # Azure OpenAI


class FakeOpenAI:
    """See the module docstring. Attributes tests read: ``url``, ``requests``,
    ``open_streams``, ``streams_started``, ``streams_closed_by_client``."""

    def __init__(self, **behaviour: Any) -> None:
        self._base = Behaviour(**behaviour)
        self._queue: list[Behaviour] = []
        self.requests: list[RecordedRequest] = []
        #: Streaming responses currently open (drops when a client disconnects).
        self.open_streams = 0
        self.streams_started = 0
        #: Streams that ended because the client went away before the end.
        self.streams_closed_by_client = 0
        #: When not None, the set of currently valid keys (others get 401); tests rotate it.
        self.valid_keys: Optional[set[str]] = None
        #: Requests answered 401 because of their key.
        self.unauthorized = 0
        #: (last message content, key) per chat request, in arrival order.
        self.key_log: list[tuple[str, str]] = []
        #: Open streams per key.
        self.open_by_key: dict[str, int] = {}
        self.port: Optional[int] = None
        self._runner: Optional[web.AppRunner] = None
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._thread: Optional[threading.Thread] = None
        self._stopping: Optional[asyncio.Event] = None

    # ------------------------------------------------------------------ configuration

    @property
    def url(self) -> str:
        """Base URL to configure a client with (``http://127.0.0.1:PORT/v1``)."""
        if self.port is None:
            raise RuntimeError("FakeOpenAI is not started")
        return f"http://127.0.0.1:{self.port}/v1"

    def configure(self, **changes: Any) -> None:
        """Change the behaviour of every later request (fields of :class:`Behaviour`)."""
        self._base = dataclasses.replace(self._base, **changes)

    def enqueue(self, **changes: Any) -> None:
        """Use a behaviour (base + ``changes``) for exactly one upcoming request (FIFO)."""
        self._queue.append(dataclasses.replace(self._base, **changes))

    def reset(self) -> None:
        """Back to the default behaviour; forget recorded requests and counters."""
        self._base = Behaviour()
        self._queue.clear()
        self.requests.clear()
        self.valid_keys = None
        self.unauthorized = 0
        self.key_log.clear()
        self.streams_started = 0
        self.streams_closed_by_client = 0

    def wait_open_streams(self, count: int, timeout: float) -> None:
        """Block until ``open_streams == count`` (sync tests); AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while self.open_streams != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"open_streams is {self.open_streams}, wanted {count}")
            time.sleep(0.01)

    async def await_open_streams(self, count: int, timeout: float) -> None:
        """Wait until ``open_streams == count`` (async tests); AssertionError on timeout."""
        deadline = time.monotonic() + timeout
        while self.open_streams != count:
            if time.monotonic() > deadline:
                raise AssertionError(f"open_streams is {self.open_streams}, wanted {count}")
            await asyncio.sleep(0.01)

    # ------------------------------------------------------------------ lifecycle

    async def astart(self) -> "FakeOpenAI":
        """Start on the running loop."""
        self._stopping = asyncio.Event()
        app = web.Application()
        self._add_routes(app)
        # handler_cancellation: a client that disconnects cancels its handler at once,
        # so open_streams reflects the upstream connection, not the next write attempt.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    def _add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_post("/openai/deployments/{name}/chat/completions", self._chat)
        app.router.add_post("/openai/deployments/{name}/embeddings", self._embeddings)
        app.router.add_get("/v1/models", self._models)

    async def astop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def start(self) -> "FakeOpenAI":
        """Start in a background thread with its own event loop (sync tests)."""
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(self.astart())
            ready.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("FakeOpenAI did not start within 10 s")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self.astop(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = self._thread = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    async def __aenter__(self) -> "FakeOpenAI":
        return await self.astart()

    async def __aexit__(self, *exc: Any) -> None:
        await self.astop()

    # ------------------------------------------------------------------ handlers

    async def _models(self, request: web.Request) -> web.Response:
        self._record(request, None)
        return web.json_response({"object": "list", "data": [
            {"id": "fake-model", "object": "model", "created": 0, "owned_by": "fake"}]})

    def _record(self, request: web.Request, body: Any) -> None:
        self.requests.append(
            RecordedRequest(request.method, request.path, dict(request.headers), body)
        )

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        self._record(request, body)
        b = self._queue.pop(0) if self._queue else self._base
        if b.headers_delay_s:
            await asyncio.sleep(b.headers_delay_s)
        if b.flex_headers_delay_s and isinstance(body, dict) and body.get("service_tier") == "flex":
            await asyncio.sleep(b.flex_headers_delay_s)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _error(400, "invalid_request_error", None, "'messages' is required.", "messages")
        key = self._key(request)
        if body["messages"]:
            self.key_log.append((str(body["messages"][-1].get("content", "")), key))
        if ((b.expected_api_key is not None and key != b.expected_api_key)
                or (self.valid_keys is not None and key not in self.valid_keys)):
            self.unauthorized += 1
            return _error(401, "invalid_request_error", "invalid_api_key",
                          f"Incorrect API key provided: {key}.")
        if b.status != 200:
            etype, code, message = _DEFAULT_ERRORS.get(
                b.status, ("server_error" if b.status >= 500 else "invalid_request_error", None,
                           f"Error {b.status}."))
            message = (b.error_message or message).format(key=key, model=body.get("model"))
            headers = {"Retry-After": b.retry_after} if b.retry_after else None
            param = "messages" if code == "context_length_exceeded" else None
            return _error(b.status, etype, b.error_code or code, message, param, headers)
        messages = body["messages"]
        last = str(messages[-1].get("content", "")) if messages else ""
        agent = read_openai(body)
        tokens = (
            [w if i == 0 else " " + w for i, w in enumerate(b.reply_text.split(" "))]
            if b.reply_text is not None else reply_tokens(last, b.reply_tokens)
        )
        if agent is not None and agent.text is not None:
            tokens = words(agent.text)
        finish = "stop"
        limit = body.get("max_completion_tokens") or body.get("max_tokens")
        if isinstance(limit, int) and len(tokens) > limit:
            tokens, finish = tokens[:limit], "length"
        call = agent if agent is not None and agent.tool else None
        finish = b.finish_reason or ("tool_calls" if call else finish)
        done = TOOL_CALL_TOKENS if call else len(tokens)
        prompt = prompt_tokens_for(messages)
        usage = {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done,
                 "prompt_tokens_details": {"cached_tokens": min(b.cached_tokens, prompt)},
                 "completion_tokens_details": {"reasoning_tokens": 0}}
        base = {"id": "chatcmpl-fake", "created": int(time.time()), "model": body.get("model")}
        calls = [{"id": "call_fake0", "type": "function", "function": {
            "name": call.tool, "arguments": call.arguments}}] if call else None
        if not body.get("stream"):
            return web.json_response({
                **base, "object": "chat.completion",
                "choices": [{"index": 0, "finish_reason": finish, "message": {
                    "role": "assistant", "content": None if call else "".join(tokens),
                    "tool_calls": calls}}],
                "usage": usage,
            })
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return await self._stream(request, b, base, tokens, finish,
                                  usage if include_usage and b.send_usage else None, key,
                                  _call_deltas(calls[0]) if calls else None)

    @staticmethod
    def _key(request: web.Request) -> str:
        auth = request.headers.get("Authorization")
        if auth is not None:
            return auth.removeprefix("Bearer ")
        return request.headers.get("api-key", "")

    async def _embeddings(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        self._record(request, body)
        b = self._queue.pop(0) if self._queue else self._base
        key = self._key(request)
        if self.valid_keys is not None and key not in self.valid_keys:
            self.unauthorized += 1
            return _error(401, "invalid_request_error", "invalid_api_key", "Incorrect API key.")
        if b.status != 200:
            return _error(b.status, "server_error", b.error_code, b.error_message or "Error.",
                          None, {"Retry-After": b.retry_after} if b.retry_after else None)
        inputs = body.get("input") if isinstance(body, dict) else None
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs:
            return _error(400, "invalid_request_error", None, "'input' is required.", "input")
        return web.json_response({"object": "list", "model": body.get("model"), "data": [
            {"object": "embedding", "index": i, "embedding": fake_embedding(str(t))}
            for i, t in enumerate(inputs)
        ], "usage": {"prompt_tokens": sum(len(str(t).split()) for t in inputs),
                     "total_tokens": sum(len(str(t).split()) for t in inputs)}})

    async def _stream(
        self, request: web.Request, b: Behaviour, base: dict[str, Any], tokens: list[str],
        finish: str, usage: Optional[dict[str, Any]], key: str = "",
        deltas: Optional[list[dict[str, Any]]] = None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        self.open_streams += 1
        self.open_by_key[key] = self.open_by_key.get(key, 0) + 1
        self.streams_started += 1
        finished = False
        try:
            await response.prepare(request)

            async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
                chunk = {**base, "object": "chat.completion.chunk", "choices": choices, **extra}
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())

            def choice(delta: dict[str, Any], finish_reason: Optional[str] = None) -> dict:
                return {"index": 0, "delta": delta, "finish_reason": finish_reason}

            chunks = [
                "".join(tokens[i:i + b.tokens_per_chunk])
                for i in range(0, len(tokens), b.tokens_per_chunk)
            ]
            if b.stall_after_chunks != 0:
                await send([choice({"role": "assistant", "content": ""})])
            for i, delta in enumerate(deltas or [{"content": text} for text in chunks]):
                if b.stall_after_chunks is not None and i >= b.stall_after_chunks:
                    await self._hang()
                if b.error_after_chunks is not None and i >= b.error_after_chunks:
                    error = {"message": "The server had an error while processing your "
                             "request.", "type": "server_error", "param": None, "code": None}
                    await response.write(f"data: {json.dumps({'error': error})}\n\n".encode())
                    finished = True
                    return response
                if b.token_delay_s:
                    await asyncio.sleep(b.token_delay_s)
                if b.disconnect_after_chunks is not None and i >= b.disconnect_after_chunks:
                    assert request.transport is not None
                    request.transport.close()  # flushes what was written, then FIN
                    return response
                await send([choice(delta)])
            if b.stall_after_chunks is not None:
                await self._hang()
            await send([choice({}, finish)])
            if usage is not None:
                await send([], usage=usage)
            if b.send_done:
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            finished = True
            return response
        finally:
            self.open_streams -= 1
            self.open_by_key[key] -= 1
            if not finished:
                self.streams_closed_by_client += 1

    async def _hang(self) -> None:
        """Keep the stream open, sending nothing, until the client leaves or we stop."""
        assert self._stopping is not None
        await self._stopping.wait()
        raise asyncio.CancelledError


def _call_deltas(call: dict[str, Any]) -> list[dict[str, Any]]:
    """A tool call as OpenAI streams it: id and name first, then argument fragments."""
    args = call["function"]["arguments"]
    half = len(args) // 2
    first = {"index": 0, "id": call["id"], "type": "function",
             "function": {"name": call["function"]["name"], "arguments": ""}}
    return [{"tool_calls": [first]}] + [
        {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
        for piece in (args[:half], args[half:])]


def _error(
    status: int, etype: str, code: Optional[str], message: str, param: Optional[str] = None,
    headers: Optional[dict[str, str]] = None,
) -> web.Response:
    body = {"error": {"message": message, "type": etype, "param": param, "code": code}}
    return web.json_response(body, status=status, headers=headers)

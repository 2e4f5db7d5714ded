"""OpenAI Responses API wire types: the request model, the response object and stream events.

Pure data (pydantic and orjson only, no gateway imports). ``input`` is a string or a list
of items: messages (content a string or ``input_text`` / ``output_text`` / ``input_image``
parts), ``function_call`` and ``function_call_output`` items (see
:mod:`serve_app.protocol.responses_tools`). Function tools, ``tool_choice``,
``parallel_tool_calls``, ``text.format`` and logprobs (``include:
["message.output_text.logprobs"]`` and ``top_logprobs``) take effect. What needs state the gateway does
not keep is refused with a 400 naming the field: ``previous_response_id``,
``conversation``, ``background``; so are hosted tools and other item types. ``store`` is
accepted and ignored (nothing is stored; responses say ``"store": false``).

Streamed events, in order (SSE ``event:`` name = the JSON ``type``, each with a
``sequence_number`` counting from 0)::

    response.created · response.in_progress · response.output_item.added ·
    response.content_part.added · response.output_text.delta … · response.output_text.done ·
    response.content_part.done · response.output_item.done ·
    [response.output_item.added (function_call) · response.function_call_arguments.delta … ·
    response.function_call_arguments.done · response.output_item.done]* ·
    response.completed | response.incomplete (max_output_tokens hit)

An error after the stream started is an ``error`` event followed by ``response.failed``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from serve_app.protocol.internal import MAX_TOP_LOGPROBS, TokenLogprob, ToolCallDelta
from serve_app.protocol.openai_tools import chat_logprobs_out
from serve_app.protocol.responses_tools import (
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    NamedFunction,
    TextFormat,
    function_call_item,
)

__all__ = [
    "RESPONSES_EXAMPLE",
    "InputPart",
    "InputMessage",
    "ResponsesRequest",
    "response_id",
    "response_object",
    "status_of",
    "ResponseStreamEncoder",
    "LOGPROBS_INCLUDE",
    "logprobs_out",
]

#: The one ``include`` value that means something here: logprobs on output text.
LOGPROBS_INCLUDE = "message.output_text.logprobs"

RESPONSES_EXAMPLE = (
    '{"model": "smollm2-135m", "input": "Write a haiku about actors.", '
    '"max_output_tokens": 64}'
)

#: Content part types that carry plain text (``output_text`` appears in replayed history).
_TEXT_PARTS = ("input_text", "output_text", "text")


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="allow")


class InputPart(_Lenient):
    """One content part: text, or ``input_image`` with an ``image_url``."""

    type: str
    text: Optional[str] = None
    image_url: Optional[str] = None
    detail: Optional[Literal["auto", "low", "high"]] = None


class InputMessage(_Lenient):
    """A message item of ``input``: ``{"role", "content"}``, optionally ``"type": "message"``."""

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Union[str, list[InputPart]]

    @field_validator("content")
    @classmethod
    def _text_only(cls, value):
        if isinstance(value, list):
            for i, part in enumerate(value):
                if part.type == "input_image":
                    if not part.image_url:
                        raise ValueError(f"content part {i} of type 'input_image' needs "
                                         "'image_url' (a data: URL or an http(s) URL)")
                    continue
                if part.type not in _TEXT_PARTS:
                    raise ValueError(
                        f"content part {i} has type {part.type!r}; accepted: 'input_text', "
                        "'input_image' (and 'output_text' in history)"
                    )
                if part.text is None:
                    raise ValueError(f"content part {i} of type {part.type!r} needs 'text'")
        return value

    @model_validator(mode="after")
    def _images_from_users(self) -> "InputMessage":
        if isinstance(self.content, list) and self.role != "user" and any(
                p.type == "input_image" for p in self.content):
            raise ValueError("input_image parts are accepted only in 'user' messages")
        return self


_ITEM_ADAPTERS = {
    "message": TypeAdapter(InputMessage),
    "function_call": TypeAdapter(FunctionCallItem),
    "function_call_output": TypeAdapter(FunctionCallOutputItem),
}


class _TextOptions(_Lenient):
    format: Optional[TextFormat] = None


_REFUSED = {
    "previous_response_id": "responses are not stored here, so there is nothing to continue; "
    "send the earlier turns in 'input' instead",
    "conversation": "conversations are not stored here; send the earlier turns in 'input'",
    "background": "background responses are not supported; omit 'background' or set it false",
}


class ResponsesRequest(_Lenient):
    """``POST /v1/responses`` (text only)."""

    model: str = Field(..., min_length=1, max_length=256)
    input: Union[str, list[Union[InputMessage, FunctionCallItem, FunctionCallOutputItem]]]
    instructions: Optional[str] = None
    max_output_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    stream: Optional[bool] = False
    store: Optional[bool] = None
    metadata: Optional[dict[str, str]] = None
    tools: Optional[list[FunctionTool]] = Field(None, max_length=128)
    tool_choice: Union[Literal["auto", "none", "required"], NamedFunction, None] = None
    parallel_tool_calls: Optional[bool] = None
    text: Optional[_TextOptions] = None
    previous_response_id: Optional[str] = None
    conversation: Optional[Any] = None
    background: Optional[bool] = None
    user: Optional[str] = None
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    include: Optional[list[str]] = None

    @field_validator("include")
    @classmethod
    def _includable(cls, value):
        other = [v for v in value or () if v != LOGPROBS_INCLUDE]
        if other:
            raise ValueError(
                f"include values not supported here: {other}; accepted: {LOGPROBS_INCLUDE!r} "
                "(no hosted tools, reasoning or stored inputs produce the others)")
        return value

    def logprobs_k(self) -> Optional[int]:
        """Top alternatives per output token (None: no logprobs). ``include`` asks for
        logprobs; ``top_logprobs`` alone asks for them too, with that many alternatives."""
        if LOGPROBS_INCLUDE in (self.include or ()) or self.top_logprobs is not None:
            return self.top_logprobs or 0
        return None
    #: Troupe's deadline-aware tier routing (see serve_app/gateway/deadline.py).
    start_within: Optional[str] = Field(None, max_length=32)
    service_tier: Optional[str] = Field(None, max_length=32)
    #: Routes requests that share it to the replica holding their prefix (local models).
    prompt_cache_key: Optional[str] = Field(None, max_length=1024)

    @field_validator("input", mode="before")
    @classmethod
    def _text_or_message_items(cls, value):
        # Validated here, before the str|list union, so a bad item yields one error that
        # names the item instead of one error per union branch.
        if isinstance(value, str):
            if not value.strip():
                raise ValueError('input is empty; send the text to answer, e.g. "input": "Hello"')
            return value
        if not isinstance(value, list):
            raise ValueError(
                "input must be a string or a list of message items, not "
                f"{type(value).__name__}"
            )
        if not value:
            raise ValueError("input is an empty list; send at least one message item")
        items = []
        for i, item in enumerate(value):
            kind = item.get("type", "message") if isinstance(item, dict) else "message"
            adapter = _ITEM_ADAPTERS.get(kind)
            if adapter is None:
                raise ValueError(
                    f"input item {i} has type {kind!r}; accepted: message, function_call, "
                    'function_call_output (e.g. {"role": "user", "content": "Hello"})'
                )
            try:
                items.append(adapter.validate_python(item))
            except ValidationError as exc:
                first = exc.errors(include_url=False)[0]
                where = ".".join(str(p) for p in (i, *first["loc"]))
                problem = first["msg"].removeprefix("Value error, ")
                raise ValueError(f"input item {where}: {problem}") from None
        return items

    @field_validator("previous_response_id", "conversation", "background")
    @classmethod
    def _stateless(cls, value, info):
        if value:
            raise ValueError(_REFUSED[info.field_name])
        return value

    def text_format(self) -> dict[str, Any]:
        """The ``text.format`` to echo in the response object."""
        fmt = self.text.format if self.text is not None else None
        return {"type": "text"} if fmt is None else fmt.model_dump(by_alias=True, exclude_none=True)


def response_id(request_id: str) -> str:
    """A ``resp_…`` id derived from the gateway's request id (so logs line up)."""
    return "resp_" + request_id.removeprefix("req_").replace("-", "")


def _usage(input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "input_tokens_details": {"cached_tokens": cached_tokens},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": input_tokens + output_tokens,
    }


def logprobs_out(entries: Optional[list[TokenLogprob]], top: Optional[int]) -> list[dict[str, Any]]:
    """An output_text's ``logprobs``: ``{token, logprob, bytes, top_logprobs}`` per token
    (empty when not asked for)."""
    if top is None or entries is None:
        return []
    out = chat_logprobs_out(entries, top)
    return out["content"] if out is not None else []


def _message_item(
    item_id: str, text: Optional[str], status: str, logprobs: Optional[list[dict[str, Any]]] = None
) -> dict[str, Any]:
    content = [] if text is None else [
        {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
    ]
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def response_object(
    resp_id: str,
    created_at: int,
    body: ResponsesRequest,
    status: str,
    text: Optional[str] = None,
    usage: Optional[tuple[int, ...]] = None,
    error: Optional[dict[str, Any]] = None,
    calls: Optional[list[ToolCallDelta]] = None,
    logprobs: Optional[list[dict[str, Any]]] = None,
) -> dict[str, Any]:
    """The ``response`` object; ``text`` None means no output item yet; ``calls`` (whole
    tool calls) become ``function_call`` items after the message; ``logprobs`` (see
    :func:`logprobs_out`) go on the message's output_text.

    ``status`` is one of ``in_progress``, ``completed``, ``incomplete`` (max_output_tokens
    hit) or ``failed`` (then ``error`` is ``{"code", "message"}``).
    """
    output = []
    item_status = "completed" if status == "completed" else "incomplete"
    if text is not None and (text or not calls):
        output.append(_message_item("msg_" + resp_id.removeprefix("resp_"), text, item_status, logprobs))
    output.extend(function_call_item(c, item_status, c.arguments) for c in calls or ())
    return {
        "id": resp_id,
        "object": "response",
        "created_at": created_at,
        "status": status,
        "error": error,
        "incomplete_details": (
            {"reason": "max_output_tokens"} if status == "incomplete" else None
        ),
        "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens,
        "model": body.model,
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0 if body.temperature is None else body.temperature,
        "text": {"format": body.text_format()},
        "tool_choice": (body.tool_choice.model_dump() if isinstance(body.tool_choice, NamedFunction)
                        else body.tool_choice or "auto"),
        "tools": [t.model_dump(exclude_none=True) for t in body.tools or ()],
        "top_logprobs": body.top_logprobs or 0,
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "truncation": "disabled",
        "usage": None if usage is None else _usage(*usage),
        "user": body.user,
        "metadata": body.metadata or {},
    }


def status_of(finish_reason: str) -> str:
    """The response ``status`` for an internal finish reason."""
    return {"stop": "completed", "tool_calls": "completed", "length": "incomplete"}.get(
        finish_reason, "failed")


class ResponseStreamEncoder:
    """Builds the SSE events of one streamed response as ``(event name, JSON text)`` pairs,
    numbering them with ``sequence_number`` in the order they are built."""

    def __init__(self, resp_id: str, created_at: int, body: ResponsesRequest) -> None:
        self.resp_id = resp_id
        self.created_at = created_at
        self.body = body
        self.item_id = "msg_" + resp_id.removeprefix("resp_")
        self.seq = 0
        self.message_open = True
        #: Logprobs asked for (top k), and those of the text sent so far.
        self.top = body.logprobs_k()
        self.logprobs: list[dict[str, Any]] = []
        # The part of every delta event that never changes (cheap per-token framing).
        self._delta_head = (
            '{"type":"response.output_text.delta","item_id":"%s","output_index":0,'
            '"content_index":0,"logprobs":[],"delta":' % self.item_id
        )

    def _event(self, name: str, payload: dict[str, Any]) -> tuple[str, str]:
        payload = {"type": name, "sequence_number": self.seq, **payload}
        self.seq += 1
        return name, orjson.dumps(payload).decode()

    def _part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": self.logprobs}

    def start(self) -> list[tuple[str, str]]:
        """``response.created`` … ``response.content_part.added``."""
        pending = response_object(self.resp_id, self.created_at, self.body, "in_progress")
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return [
            self._event("response.created", {"response": pending}),
            self._event("response.in_progress", {"response": pending}),
            self._event(
                "response.output_item.added",
                {"output_index": 0, "item": _message_item(self.item_id, None, "in_progress")},
            ),
            self._event(
                "response.content_part.added",
                {**where, "part": {"type": "output_text", "text": "", "annotations": []}},
            ),
        ]

    def delta(self, text: str, entries: Optional[list[TokenLogprob]] = None) -> tuple[str, str]:
        """One ``response.output_text.delta`` (with its tokens' logprobs when asked for)."""
        if self.top is not None:
            logprobs = logprobs_out(entries, self.top)
            self.logprobs.extend(logprobs)
            return self._event("response.output_text.delta", {
                "item_id": self.item_id, "output_index": 0, "content_index": 0,
                "logprobs": logprobs, "delta": text})
        seq = self.seq
        self.seq += 1
        return "response.output_text.delta", '%s%s,"sequence_number":%d}' % (
            self._delta_head, orjson.dumps(text).decode(), seq,
        )

    def message_done(self, text: str, item_status: str) -> list[tuple[str, str]]:
        """Close the message item (output 0): text done, part done, item done."""
        self.message_open = False
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return [
            self._event("response.output_text.done", {**where, "text": text, "logprobs": self.logprobs}),
            self._event("response.content_part.done", {**where, "part": self._part(text)}),
            self._event(
                "response.output_item.done",
                {"output_index": 0, "item": _message_item(self.item_id, text, item_status, self.logprobs)},
            ),
        ]

    def call_added(self, text: str, call: ToolCallDelta) -> list[tuple[str, str]]:
        """A function call starts (output ``1 + call.index``), closing the message first."""
        events = self.message_done(text, "completed") if self.message_open else []
        item = function_call_item(call, "in_progress", "")
        events.append(self._event("response.output_item.added",
                                  {"output_index": 1 + call.index, "item": item}))
        return events

    def call_delta(self, call: ToolCallDelta, fragment: str) -> tuple[str, str]:
        item = function_call_item(call, "in_progress", "")
        return self._event("response.function_call_arguments.delta", {
            "item_id": item["id"], "output_index": 1 + call.index, "delta": fragment})

    def call_done(self, call: ToolCallDelta, status: str) -> list[tuple[str, str]]:
        item = function_call_item(call, status, call.arguments)
        return [
            self._event("response.function_call_arguments.done", {
                "item_id": item["id"], "output_index": 1 + call.index, "name": item["name"],
                "arguments": call.arguments}),
            self._event("response.output_item.done",
                        {"output_index": 1 + call.index, "item": item}),
        ]

    def finish(
        self, text: str, finish_reason: str, input_tokens: int, output_tokens: int,
        calls: Optional[list[ToolCallDelta]] = None, cached_tokens: int = 0,
    ) -> list[tuple[str, str]]:
        """The open items' done events, then ``response.completed`` (or ``.incomplete``)."""
        status = status_of(finish_reason)
        item_status = "completed" if status == "completed" else "incomplete"
        events = self.message_done(text, item_status) if self.message_open else []
        for call in calls or ():
            events.extend(self.call_done(call, item_status))
        final = response_object(
            self.resp_id, self.created_at, self.body, status, text,
            (input_tokens, output_tokens, cached_tokens), calls=calls, logprobs=self.logprobs,
        )
        if calls and not text:  # the stream opened a message item: the snapshot keeps it
            final["output"].insert(0, _message_item(self.item_id, "", item_status))
        terminal = "response.incomplete" if status == "incomplete" else "response.completed"
        events.append(self._event(terminal, {"response": final}))
        return events

    def failed(
        self, code: str, message: str, text: str, input_tokens: int, output_tokens: int
    ) -> list[tuple[str, str]]:
        """An ``error`` event, then ``response.failed`` carrying the same error."""
        failed = response_object(
            self.resp_id, self.created_at, self.body, "failed", text or None,
            (input_tokens, output_tokens), error={"code": code, "message": message},
        )
        return [
            self._event("error", {"code": code, "message": message, "param": None}),
            self._event("response.failed", {"response": failed}),
        ]

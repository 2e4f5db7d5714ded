"""Tool calls parsed out of a local model's output, streaming: text outside calls stays
text, calls become :class:`ToolCallDelta` fragments.

Parsers are chosen per template family by ``tool_call_parser`` in the engine config, as
in vLLM (``--tool-call-parser``). ``hermes`` (Hermes, Qwen 2.5/3, SmolLM3 and the prompt
Troupe renders itself for templates without tools) reads
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Two modes:

* ``auto``: the model writes the call unconstrained. Once a call's head names one of the
  request's tools, the call is announced and its arguments stream as fragments while the
  model writes them (as OpenAI streams calls), so a client sees a long call grow instead
  of waiting for its end. Such a call is checked against the tool's schema when it closes;
  it cannot be taken back then, so a failure is only recorded (``rejected``). A
  call in any other shape is held to its closing tag and emitted only if its arguments
  parse and validate (else it stays ordinary text). Required and named calls, which are
  constrained, are the way to a call that is guaranteed valid.
* forced (``tool_choice`` required or named): the grammar already guarantees a valid call,
  so :class:`ForcedCallParser` streams the name first and argument fragments as they
  arrive, as OpenAI does.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any, Optional

import jsonschema

from serve_app.errors import InvalidRequest
from serve_app.protocol.internal import GenerationRequest, NamedTool, ToolCall, ToolCallDelta, ToolSpec

__all__ = ["PARSERS", "parser_for", "HermesToolParser", "ForcedCallParser", "new_call_id", "validate_arguments"]


def new_call_id() -> str:
    """A fresh tool-call id in OpenAI's shape."""
    return "call_" + secrets.token_hex(12)


def validate_arguments(tool: Optional[ToolSpec], arguments: str) -> Optional[str]:
    """Why ``arguments`` is not a valid call of ``tool`` (None when it is)."""
    if tool is None:
        return "no such tool"
    try:
        value = json.loads(arguments)
    except ValueError as exc:
        return f"arguments are not JSON: {exc}"
    if not isinstance(value, dict):
        return "arguments are not a JSON object"
    try:
        jsonschema.validate(value, tool.parameters or {"type": "object"})
    except jsonschema.ValidationError as exc:
        return f"arguments do not match the schema: {exc.message}"
    except jsonschema.SchemaError as exc:
        return f"the tool's schema is invalid: {exc.message}"
    return None


class _ValueScanner:
    """Finds where one JSON value ends in text that arrives piece by piece."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_string = False
        self.escaped = False
        self.started = False
        self.done = False

    def feed(self, text: str) -> int:
        """Consume ``text``; returns how many characters belong to the value."""
        for i, ch in enumerate(text):
            if self.done:
                return i
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    self.done = self.depth == 0
                continue
            if ch.isspace() and not self.started:
                continue
            if self.depth == 0 and self.started and ch in ",}]":
                self.done = True  # the end of a scalar value
                return i
            self.started = True
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                self.done = self.depth == 0
        return len(text)


_HEAD = re.compile(r'^\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:')


class ForcedCallParser:
    """The whole output is one call the grammar guaranteed; streams it as it arrives.

    ``name`` given (``tool_choice`` named): the output is the arguments object itself.
    Otherwise (``required``) it is ``{"name": ..., "arguments": {...}}``.
    """

    def __init__(self, name: Optional[str] = None) -> None:
        self._name = name
        self._id = new_call_id()
        self._buffer = ""
        self._announced = False
        self._scanner = _ValueScanner()
        self.calls_made = 0

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Take more output; returns (text outside calls, call fragments)."""
        deltas: list[ToolCallDelta] = []
        if self._name is not None:
            if not self._announced:
                self._announced = True
                self.calls_made = 1
                deltas.append(ToolCallDelta(0, self._id, self._name, ""))
            if text:
                deltas.append(ToolCallDelta(0, None, None, text))
            return "", deltas
        if not self._announced:
            self._buffer += text
            head = _HEAD.match(self._buffer)
            if head is None:
                return "", deltas
            self._announced = True
            self.calls_made = 1
            deltas.append(ToolCallDelta(0, self._id, json.loads(f'"{head.group(1)}"'), ""))
            text, self._buffer = self._buffer[head.end() :], ""
        if not self._scanner.done:
            take = self._scanner.feed(text)
            if text[:take]:
                deltas.append(ToolCallDelta(0, None, None, text[:take]))
        return "", deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The output ended; nothing is held back in this mode."""
        return "", []


class HermesToolParser:
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in free output (auto mode).

    A call whose head (``{"name": "<a tool of the request>", "arguments":``) has arrived is
    announced at once (index, id, name) and its arguments stream as fragments while the
    model writes them, as OpenAI streams calls. A call in another shape (``parameters``,
    keys in another order) is held until its closing tag and emitted whole if it
    validates, or given back as text if it does not.
    """

    start = "<tool_call>"
    end = "</tool_call>"

    def __init__(self, tools: tuple[ToolSpec, ...], parallel: bool = True) -> None:
        self._tools = {t.name: t for t in tools}
        self._parallel = parallel
        self._buffer = ""
        self._in_call = False
        #: The call being streamed: (index, name, arguments so far, scanner).
        self._streaming: Optional[tuple[int, str, list[str], _ValueScanner]] = None
        self.calls_made = 0
        #: Why calls the model wrote were not accepted (their text went out as text), or
        #: why a call already streamed turned out invalid.
        self.rejected: list[str] = []

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Take more output; returns (text outside calls, call fragments)."""
        self._buffer += text
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        while True:
            if not self._in_call:
                at = self._buffer.find(self.start)
                if at < 0:
                    keep = _partial_suffix(self._buffer, self.start)
                    out.append(self._buffer[: len(self._buffer) - keep])
                    self._buffer = self._buffer[len(self._buffer) - keep :]
                    break
                out.append(self._buffer[:at])
                self._buffer = self._buffer[at + len(self.start) :]
                self._in_call = True
            if self._streaming is None:
                self._announce(deltas)
            if self._streaming is not None:
                self._stream_arguments(deltas)
            at = self._buffer.find(self.end)
            if at < 0:
                break
            body, self._buffer = self._buffer[:at], self._buffer[at + len(self.end) :]
            self._in_call = False
            if self._streaming is not None:
                self._end_streamed()
            else:
                self._close(body, out, deltas)
        return "".join(out), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The output ended: a call missing only its closing tag still counts."""
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        if self._streaming is not None:
            self._end_streamed()
        elif self._in_call:
            self._close(self._buffer, out, deltas)
        else:
            out.append(self._buffer)
        self._buffer, self._in_call = "", False
        return "".join(out), deltas

    def _announce(self, deltas: list[ToolCallDelta]) -> None:
        """Start streaming the call in the buffer once its head names one of the tools."""
        head = _HEAD.match(self._buffer)
        if head is None:
            return
        name = json.loads(f'"{head.group(1)}"')
        if name not in self._tools or (self.calls_made and not self._parallel):
            return  # held whole until its closing tag; _close decides
        index = self.calls_made
        self.calls_made += 1
        deltas.append(ToolCallDelta(index, new_call_id(), name, ""))
        self._buffer = self._buffer[head.end() :]
        self._streaming = (index, name, [], _ValueScanner())

    def _stream_arguments(self, deltas: list[ToolCallDelta]) -> None:
        assert self._streaming is not None  # checked by the caller
        index, _, parts, scanner = self._streaming
        if scanner.done:
            return
        take = scanner.feed(self._buffer)
        fragment, self._buffer = self._buffer[:take], self._buffer[take:]
        if not parts:
            fragment = fragment.lstrip()
        if fragment:
            parts.append(fragment)
            deltas.append(ToolCallDelta(index, None, None, fragment))

    def _end_streamed(self) -> None:
        """The streamed call ended; it was already sent, so a bad one is only recorded."""
        assert self._streaming is not None  # checked by the caller
        _, name, parts, _ = self._streaming
        self._streaming = None
        why = validate_arguments(self._tools.get(name), "".join(parts))
        if why is not None:
            self.rejected.append(f"{name}: {why} (the call was already streamed)")

    def _close(self, body: str, out: list[str], deltas: list[ToolCallDelta]) -> None:
        call = self._accept(body)
        if call is None:
            out.append(self.start + body + self.end)
            return
        if self.calls_made and not self._parallel:
            self.rejected.append("parallel_tool_calls is false: only the first call is kept")
            return
        index = self.calls_made
        self.calls_made += 1
        deltas.append(ToolCallDelta(index, call.id, call.name, ""))
        deltas.append(ToolCallDelta(index, None, None, call.arguments))

    def _accept(self, body: str) -> Optional[ToolCall]:
        try:
            value = json.loads(body)
        except ValueError:
            self.rejected.append("not JSON")
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            self.rejected.append("no function name")
            return None
        args = value.get("arguments", value.get("parameters", {}))
        arguments = json.dumps(args, ensure_ascii=False)
        why = validate_arguments(self._tools.get(value["name"]), arguments)
        if why is not None:
            self.rejected.append(f"{value['name']}: {why}")
            return None
        return ToolCall(new_call_id(), value["name"], arguments)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that could be the start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


#: ``tool_call_parser`` config values -> parser classes for auto mode.
PARSERS = {"hermes": HermesToolParser}


def parser_for(request: GenerationRequest, tool_call_parser: Optional[str]) -> Any:
    """The parser a request's output goes through (None: no tools, or tool_choice none).

    Raises:
        InvalidRequest: ``tool_choice`` auto on a model with no parser configured.
    """
    choice = request.tool_choice
    if not request.tools or choice == "none":
        return None
    if isinstance(choice, NamedTool):
        return ForcedCallParser(choice.name)
    if choice == "required":
        return ForcedCallParser()
    parser_cls = PARSERS.get(tool_call_parser or "")
    if parser_cls is None:
        raise InvalidRequest(
            "This model has no tool-call parser configured (tool_call_parser), so it can "
            "only call tools with tool_choice 'required' or a named tool.",
            param="tool_choice",
        )
    return parser_cls(request.tools, request.parallel_tool_calls)

"""Tool calls parsed out of a local model's output, streaming: text outside calls stays
text, calls become :class:`ToolCallDelta` fragments.

Parsers are chosen per template family by ``tool_call_parser`` in the engine config, as
in vLLM (``--tool-call-parser``). ``hermes`` (Hermes, Qwen 2.5/3, SmolLM3 and the prompt
Troupe renders itself for templates without tools) reads
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``.

Two modes:

* ``auto``: the model wrote the call unconstrained, so each call is held until its closing
  tag, then its arguments must parse as JSON and validate against the tool's schema; only
  then is it emitted (a call that fails stays ordinary text, so nothing invalid ever
  reaches a client as a call).
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
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in free output (auto mode)."""

    start = "<tool_call>"
    end = "</tool_call>"

    def __init__(self, tools: tuple[ToolSpec, ...], parallel: bool = True) -> None:
        self._tools = {t.name: t for t in tools}
        self._parallel = parallel
        self._buffer = ""
        self._in_call = False
        self.calls_made = 0
        #: Why calls the model wrote were not accepted (their text went out as text).
        self.rejected: list[str] = []

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        """Take more output; returns (text outside calls, whole validated calls)."""
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
            at = self._buffer.find(self.end)
            if at < 0:
                break
            body, self._buffer = self._buffer[:at], self._buffer[at + len(self.end) :]
            self._in_call = False
            self._close(body, out, deltas)
        return "".join(out), deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        """The output ended: a call missing only its closing tag still counts."""
        out: list[str] = []
        deltas: list[ToolCallDelta] = []
        if self._in_call:
            self._close(self._buffer, out, deltas)
        else:
            out.append(self._buffer)
        self._buffer, self._in_call = "", False
        return "".join(out), deltas

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

"""Incremental Server-Sent Events parsing, shared by the remote provider engines."""

from __future__ import annotations

from typing import Iterator, Optional

__all__ = ["SSEParser"]


class SSEParser:
    """Incremental Server-Sent Events parser (the WHATWG rules Troupe needs).

    Feed it bytes as they arrive; it yields the ``data`` of each complete event (several
    ``data:`` lines joined by ``\\n``). Lines end in ``\\n``, ``\\r\\n`` or ``\\r``; a blank
    line ends an event; lines starting with ``:`` are comments; other fields (``event``,
    ``id``, ``retry``) are ignored: every provider Troupe speaks repeats the event type
    inside the JSON data.
    """

    def __init__(self) -> None:
        self._buffer = ""
        self._data: list[str] = []
        self._decoder_tail = b""

    def feed(self, chunk: bytes) -> Iterator[str]:
        """Consume ``chunk``; yield the data of every event it completes."""
        raw = self._decoder_tail + chunk
        try:
            text = raw.decode("utf-8")
            self._decoder_tail = b""
        except UnicodeDecodeError as exc:
            # A multi-byte character split across reads: keep its start for the next feed.
            if exc.start < len(raw) - 3:
                raise
            text = raw[: exc.start].decode("utf-8")
            self._decoder_tail = raw[exc.start:]
        self._buffer += text
        while True:
            cut = _line_end(self._buffer)
            if cut is None:
                return
            end, skip = cut
            line = self._buffer[:end]
            self._buffer = self._buffer[end + skip:]
            if line == "":
                if self._data:
                    yield "\n".join(self._data)
                    self._data = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if name == "data":
                self._data.append(value[1:] if value.startswith(" ") else value)

    def close(self) -> Iterator[str]:
        """End of stream: an event not terminated by a blank line is dispatched anyway."""
        if self._buffer:
            yield from self.feed(b"\n\n")
        elif self._data:
            yield from self.feed(b"\n")


def _line_end(buffer: str) -> Optional[tuple[int, int]]:
    """Index and length of the first line terminator, or None when the line is partial."""
    n = buffer.find("\n")
    r = buffer.find("\r", 0, n if n >= 0 else len(buffer))
    if r >= 0:
        if r + 1 == len(buffer):
            return None  # could be the start of "\r\n": wait for the next byte
        return r, 2 if buffer[r + 1] == "\n" else 1
    if n >= 0:
        return n, 1
    return None



"""Stop strings over a growing decoded text: where one ends the output, and what may be sent.

A stop string can span tokens, so text that might be the start of one is held back until
the next token shows whether it is.
"""

from __future__ import annotations

from typing import Optional, Sequence

__all__ = ["StopStringTracker", "find_stop"]


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> Optional[int]:
    """Index of the earliest stop string in ``text[start:]`` (as an index into ``text``)."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


class StopStringTracker:
    """Turns successive full decodes of the output into deltas safe to stream.

    It holds back the last ``len(longest stop) - 1`` characters (which may be the start of
    a stop string) and trailing U+FFFD (an incomplete multi-byte character), so the text
    already streamed never has to be taken back. Once a stop string shows up the output is
    cut right before it.
    """

    __slots__ = ("stops", "holdback", "sent", "stopped", "matched")

    def __init__(self, stops: Sequence[str] = ()) -> None:
        self.stops = tuple(s for s in stops if s)
        self.holdback = max((len(s) for s in self.stops), default=1) - 1
        self.sent = ""
        self.stopped = False
        #: The stop string found (reported as the output's ``stop_sequence``).
        self.matched: Optional[str] = None

    def _stop_at(self, full: str, hit: int) -> int:
        self.stopped = True
        self.matched = next(s for s in self.stops if full.startswith(s, hit))
        return hit

    def update(self, full: str) -> tuple[str, bool]:
        """Feed the whole output decoded so far; returns (new text to stream, stop hit)."""
        if self.stopped:
            return "", True
        # A stop string cannot start inside text already sent (that is what holdback buys).
        hit = find_stop(full, self.stops, max(0, min(len(self.sent), len(full))))
        if hit is not None:
            return self._advance(full, self._stop_at(full, hit)), True
        end = len(full)
        while end > 0 and full[end - 1] == "\ufffd":
            end -= 1
        return self._advance(full, end - self.holdback), False

    def flush(self, full: str) -> str:
        """The output is complete: stream everything not sent yet (after a stop check)."""
        if self.stopped:
            return ""
        hit = find_stop(full, self.stops, max(0, min(len(self.sent), len(full))))
        if hit is not None:
            return self._advance(full, self._stop_at(full, hit))
        return self._advance(full, len(full))

    def _advance(self, full: str, end: int) -> str:
        if end <= len(self.sent):
            return ""
        delta = full[len(self.sent) : end]
        self.sent += delta
        return delta

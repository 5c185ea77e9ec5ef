"""Phrase segmenter: turns text streamed by an LLM, token by token, into speakable phrases.

Phrases end at sentence punctuation (. ! ? … and CJK 。！？) or clause punctuation (, ; : — and
CJK ，、；：) once they hold at least `min_chars`, or at the last word boundary when they would grow
past `max_chars`. Every decision depends only on the text, never on how it was chunked: a mark
whose meaning depends on the next character ("3." may become "3.5") waits for that character, or
for `flush()` / the idle deadline.
"""

from __future__ import annotations

import re
import time

from csm_voice_api.errors import InvalidInput

# Latin marks end a phrase only when whitespace follows them: this is what keeps 3.5, 1,000,
# 10:30, URLs (https://x.y/z?q=1.2) and e-mails (a.b@c.d) whole, since none contains a space.
_SENTENCE = frozenset(".!?…")
_CLAUSE = frozenset(",;:–")
# CJK marks and the em dash end a phrase whatever follows (CJK text has no spaces).
_OPEN_SENTENCE = frozenset("。！？")
_OPEN_CLAUSE = frozenset("，、；：—")
# Characters that stay attached to the mark before them: runs ("?!", "...", "——") and closers.
_RUN = _SENTENCE | _OPEN_SENTENCE | frozenset("—")
_CLOSERS = frozenset("\"')]}”’»」』）》】")
_OPENERS = "\"'([{“‘«「『（《【"

# Words whose trailing period never ends a sentence. Dotted forms (e.g, i.e, U.S, a.m, p.m) and
# single-letter initials are caught by _DOTTED instead.
# Kept short on purpose: an entry that is also a common word ("no", "fig") would glue sentences.
_ABBREVIATIONS = frozenset("dr mr mrs ms prof st vs etc jr sr mt approx dept vol cf sgt".split())
_DOTTED = re.compile(r"(?:[^\W\d_]\.)*[^\W\d_]")
_SPACES = re.compile(r"\s+")

_PENDING = -1  # decision needs a character that has not arrived yet
_NO = 0  # not a phrase boundary


class PhraseSegmenter:
    """Splits streamed text into phrases. Not thread-safe: one per session.

    `push()` returns the phrases a chunk completed, `flush()` everything left. The caller owns
    the clock: `push(..., now=)` records when text last arrived, `deadline(now)` says how long
    until an idle flush is due and `poll_idle(now)` performs it. Phrases are whitespace-normalised
    (runs collapsed to one space, ends stripped) and never empty.
    """

    def __init__(self, min_chars: int = 20, max_chars: int = 250, idle_flush_s: float | None = 1.0):
        if min_chars < 0:
            raise InvalidInput("min_chars must be >= 0.", param="min_chars")
        if max_chars < 1 or max_chars < min_chars:
            raise InvalidInput("max_chars must be >= 1 and >= min_chars.", param="max_chars")
        if idle_flush_s is not None and idle_flush_s <= 0:
            raise InvalidInput("idle_flush_s must be > 0, or None to disable.", param="idle_flush_s")
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.idle_flush_s = idle_flush_s
        self._buf = ""  # normalised text of the phrase in progress; never starts with a space
        self._scan = 0  # every mark before this index is decided "not a boundary"
        self._last_input: float | None = None

    @property
    def pending(self) -> str:
        """Text buffered but not yet emitted."""
        return self._buf.strip()

    def push(self, text: str, *, final: bool = False, now: float | None = None) -> list[str]:
        """Add a chunk; return the phrases it completed (all remaining text too when `final`)."""
        if text:
            self._last_input = time.monotonic() if now is None else now
            chunk = _SPACES.sub(" ", text)
            if not self._buf or self._buf.endswith(" "):
                chunk = chunk.lstrip(" ")
            self._buf += chunk
        return self._drain(final)

    def flush(self) -> list[str]:
        """Emit everything buffered, resolving marks that were waiting for their next character."""
        return self._drain(final=True)

    def deadline(self, now: float) -> float | None:
        """Seconds from `now` until an idle flush is due (0.0 if overdue); None if none will be."""
        if self.idle_flush_s is None or self._last_input is None or not self.pending:
            return None
        return max(0.0, self._last_input + self.idle_flush_s - now)

    def poll_idle(self, now: float) -> list[str]:
        """Flush if no text arrived for `idle_flush_s`; otherwise return []."""
        remaining = self.deadline(now)
        if remaining is None or remaining > 0.0:
            return []
        return self.flush()

    def clear(self) -> None:
        """Drop buffered text (e.g. the user interrupted the turn)."""
        self._buf = ""
        self._scan = 0
        self._last_input = None

    def _drain(self, final: bool) -> list[str]:
        out: list[str] = []
        buf, i = self._buf, self._scan
        while i < len(buf):
            if i >= self.max_chars:
                cut = _word_cut(buf, self.max_chars)
            else:
                cut = self._boundary_at(buf, i, final)
                if cut == _PENDING:
                    break
                if cut == _NO:
                    i += 1
                    continue
            out.append(buf[:cut].strip())
            buf, i = buf[cut:].lstrip(" "), 0
        if final:
            if buf.strip():
                out.append(buf.strip())
            buf, i = "", 0
        self._buf, self._scan = buf, i
        return out

    def _boundary_at(self, buf: str, i: int, final: bool) -> int:
        """Cut index if the mark at `i` ends a phrase, else _NO or _PENDING."""
        c = buf[i]
        latin = c in _SENTENCE or c in _CLAUSE
        if not latin and c not in _OPEN_SENTENCE and c not in _OPEN_CLAUSE:
            return _NO
        if i > 0 and buf[i - 1] in _RUN and c in _RUN:
            return _NO  # inside a run: decided at its first mark
        run_end = i + 1
        if c in _RUN:
            while run_end < len(buf) and buf[run_end] in _RUN:
                run_end += 1
        j = run_end
        while j < len(buf) and buf[j] in _CLOSERS:
            j += 1
        if j == len(buf) and not final:
            return _PENDING
        if latin and j < len(buf) and buf[j] != " ":
            return _NO
        if c == "." and run_end == i + 1 and _is_abbreviation(buf, i):
            return _NO
        if j < self.min_chars or j > self.max_chars:  # buf[:j] has no space at either end
            return _NO
        return j


def _is_abbreviation(buf: str, dot: int) -> bool:
    """Whether the single period at `dot` closes an abbreviation or initial (Dr., U.S., J.)."""
    start = buf.rfind(" ", 0, dot) + 1
    word = buf[start:dot].lstrip(_OPENERS)
    return word.lower() in _ABBREVIATIONS or _DOTTED.fullmatch(word) is not None


def _word_cut(buf: str, max_chars: int) -> int:
    """Cut for a phrase that would exceed max_chars: the last space that keeps it within the limit."""
    space = buf.rfind(" ", 0, max_chars + 1)
    return space if space > 0 else max_chars

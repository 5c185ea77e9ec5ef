"""Whether streams keep real time: each response's audio against a listener playing it back.

A listener starts playing at a response's first audio and plays on at 24 kHz. Audio that is
ready after the listener ran out is a stall: the listener heard a gap, then starts again from
there (it re-buffers). Time the response spends handing audio to its client (encoding, a client
that reads slowly) moves the listener's clock on too: a slow reader delays only itself, and is not
the server falling behind. So a stall here is the server's own lateness: engine, watermark, event
loop. Every route's audio passes `audio_out.watermarked`, which keeps one `Playout` per response
(per phrase on a WebSocket: the gap while the next phrase's text arrives is not a stall).

Stalls go to `csm_stream_stall_seconds` and to `RECENT`, which admission reads (`RealtimeLimit`):
while streams accepted earlier stall, new generations wait. That is the signal the listener
hears; the engine's step time alone missed it when the watermark fell behind (BENCHMARKS.md).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from csm_voice_api.api import metrics
from csm_voice_api.engine.types import SAMPLE_RATE

RECENT_WINDOW_S = 5.0  # how long a stall keeps new generations out: a few phrases of speech


class Playout:
    """One response's listener clock (event loop only)."""

    def __init__(self, now: Callable[[], float] = time.monotonic):
        self._now = now
        self._runs_out: float | None = None  # when the listener has played all audio ready so far

    def ready(self, samples: int) -> float:
        """`samples` more audio are ready now: the seconds the listener had been waiting for it (0: in time)."""
        t = self._now()
        stall = 0.0 if self._runs_out is None else max(0.0, t - self._runs_out)
        start = t if self._runs_out is None or stall > 0 else self._runs_out
        self._runs_out = start + samples / SAMPLE_RATE
        return stall

    def handed_over(self, seconds: float) -> None:
        """The response spent `seconds` handing audio to its client: the listener waited on that too."""
        if self._runs_out is not None:
            self._runs_out += seconds


class RecentStalls:
    """Stalls of the last `window_s` seconds, across all streams (event loop only)."""

    def __init__(self, window_s: float = RECENT_WINDOW_S, now: Callable[[], float] = time.monotonic):
        self.window_s = window_s
        self._now = now
        self._events: deque[tuple[float, float]] = deque()  # (when, seconds)

    def record(self, seconds: float) -> None:
        metrics.STREAM_STALLS.observe(seconds)
        self._events.append((self._now(), seconds))
        self._prune()

    def worst(self) -> float:
        """The longest stall within the window, in seconds (0: none)."""
        self._prune()
        return max((s for _, s in self._events), default=0.0)

    def clear(self) -> None:
        self._events.clear()

    def _prune(self) -> None:
        cut = self._now() - self.window_s
        while self._events and self._events[0][0] < cut:
            self._events.popleft()


RECENT = RecentStalls()  # process-wide, as the metrics are: one server per process

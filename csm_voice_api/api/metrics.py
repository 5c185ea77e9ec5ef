"""Prometheus metrics, all defined here. Code that serves requests updates them; GET /metrics reads them.

Engine counters (queue depth, frames generated, slots) are read from `engine.stats()` at scrape time,
so the engine itself never depends on this module.

`csm_stage_seconds{stage=...}` times each step generated audio takes between the engine and the
socket, per chunk, so a load run shows where a stream's time goes (bench/load.py prints it):

  engine_first_chunk  generate() called -> the stream's first chunk (queue, prefill, first frames)
  engine_chunk_gap    between consecutive chunks of one stream, as the stream receives them
  engine_wait         the part of that gap the stream sat waiting on the engine (0: engine ahead)
  watermark_wait      a watermark piece queued for a free watermark worker
  watermark_compute   one watermark call in its worker (its piece's wait for, and run in, a batch)
  loop_lag            worker done -> the stream's coroutine running again (event-loop backlog)
  encode              one response encoder write/flush (pcm, wav, mp3, ...), on the event loop
  send_http           one HTTP body send of a generation (blocks on TCP flow control)
  send_ws             one WebSocket send (audio or event)
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import aclosing
from typing import Any, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter("csm_speech_requests", "Speech requests started, by route.", ["route"], registry=REGISTRY)
REJECTIONS = Counter(
    "csm_rejections", "Requests refused for lack of capacity or over a limit, by reason.", ["reason"], registry=REGISTRY
)
TTFA = Histogram(
    "csm_time_to_first_audio_seconds",
    "Seconds from request accepted to first audio chunk produced, by route.",
    ["route"],
    buckets=(0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0),
    registry=REGISTRY,
)

STREAM_STALLS = Histogram(
    "csm_stream_stall_seconds",
    "Gaps a listener playing a stream in real time heard: audio the server had ready late, per gap "
    "(api/playout.py; a client's own slow reading is not counted).",
    buckets=(0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0, 10.0),
    registry=REGISTRY,
)


STAGES = (
    "engine_first_chunk", "engine_chunk_gap", "engine_wait", "watermark_wait", "watermark_compute",
    "loop_lag", "encode", "send_http", "send_ws",
)  # fmt: skip
# 1 ms to 10 s, finest around a chunk (160-240 ms) and a watermark piece (5-50 ms).
STAGE_BUCKETS = (
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3,
    0.4, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
STAGE_SECONDS = Histogram(
    "csm_stage_seconds",
    "Seconds per chunk spent in each step between the engine and the socket, by stage.",
    ["stage"],
    buckets=STAGE_BUCKETS,
    registry=REGISTRY,
)
# Children made up front: every stage is exported (count 0) from the first scrape, and observing
# skips the label lookup.
_STAGE = {name: STAGE_SECONDS.labels(stage=name) for name in STAGES}


def observe(stage: str, seconds: float) -> None:
    """Records `seconds` spent in `stage` (one of STAGES)."""
    _STAGE[stage].observe(max(seconds, 0.0))


class _HasFrames(Protocol):
    frames: int


C = TypeVar("C", bound=_HasFrames)


async def engine_timed(chunks: AsyncIterator[C]) -> AsyncIterator[C]:
    """`chunks` (one stream's engine chunks) unchanged, timing engine_first_chunk, engine_chunk_gap
    and engine_wait on the chunks that carry audio. Closing it closes `chunks` (aborts the work)."""
    started = time.perf_counter()
    last: float | None = None
    async with aclosing(chunks) as it:  # type: ignore[type-var]
        while True:
            asked = time.perf_counter()
            try:
                chunk = await anext(it)
            except StopAsyncIteration:
                return
            if chunk.frames:
                now = time.perf_counter()
                if last is None:
                    observe("engine_first_chunk", now - started)
                else:
                    observe("engine_chunk_gap", now - last)
                    observe("engine_wait", now - asked)
                last = now
            yield chunk


class _Encoder(Protocol):
    content_type: str

    def write(self, pcm: Any) -> bytes: ...

    def flush(self) -> bytes: ...

    def close(self) -> None: ...


class TimedEncoder:
    """A response encoder whose write and flush are timed as the encode stage; same bytes."""

    def __init__(self, inner: _Encoder):
        self.inner = inner
        self.content_type = inner.content_type

    def write(self, pcm: Any) -> bytes:
        t = time.perf_counter()
        try:
            return self.inner.write(pcm)
        finally:
            observe("encode", time.perf_counter() - t)

    def flush(self) -> bytes:
        t = time.perf_counter()
        try:
            return self.inner.flush()
        finally:
            observe("encode", time.perf_counter() - t)

    def close(self) -> None:
        self.inner.close()


class _HasStats(Protocol):
    def stats(self) -> dict[str, Any]: ...


class _EngineCollector(Collector):
    def __init__(self) -> None:
        self.engine: _HasStats | None = None
        self.admission: _HasStats | None = None
        self.sessions: Callable[[], Any] = lambda: None  # -> the SessionManager (wired after start-up)
        self.watermark: _HasStats | None = None  # the app's batched watermark encoder

    def collect(self) -> Iterator[Metric]:
        manager = self.sessions()
        sessions = manager.list() if manager is not None else []
        yield GaugeMetricFamily("csm_active_sessions", "Open realtime sessions.", value=len(sessions))
        yield GaugeMetricFamily("csm_attached_sessions", "Sessions with a WebSocket or stream attached.",
                                value=sum(1 for s in sessions if s.attached))
        adm = self.admission.stats() if self.admission is not None else {}
        yield GaugeMetricFamily("csm_inflight_generations", "HTTP generations admitted and not finished.",
                                value=adm.get("inflight", 0))
        yield GaugeMetricFamily("csm_admission_capacity", "Generations admitted at once before 429.",
                                value=adm.get("capacity", 0))
        yield GaugeMetricFamily("csm_open_websockets", "Open WebSocket connections.", value=adm.get("websockets", 0))
        yield GaugeMetricFamily("csm_draining", "1 while shutting down (SIGTERM received).",
                                value=int(adm.get("draining", False)))
        stats = self.engine.stats() if self.engine is not None else {}
        yield CounterMetricFamily("csm_frames", "Audio frames (80 ms) generated.", value=stats.get("frames_total", 0))
        yield GaugeMetricFamily("csm_queue_depth", "Requests waiting for a slot.", value=stats.get("queued", 0))
        yield GaugeMetricFamily("csm_active_generations", "Slots generating now.", value=stats.get("active", 0))
        yield GaugeMetricFamily("csm_slots", "Generation slots on the device.", value=stats.get("slots", 0))
        yield GaugeMetricFamily("csm_free_slots", "Slots free now.", value=stats.get("free_slots", 0))
        yield CounterMetricFamily("csm_engine_steps", "Decode steps run (one frame for every generating slot).",
                                  value=stats.get("steps_total", 0))
        thread = CounterMetricFamily(
            "csm_engine_thread_seconds",
            "Engine thread time: busy (turns that did work), wait (of which blocked on a step's outputs), "
            "codec (of which blocked on a frame's Mimi decode), prefill (of which prompt forwards).",
            labels=["part"])
        for part, value in stats.get("seconds", {}).items():
            thread.add_metric([part], value)
        yield thread
        yield CounterMetricFamily("csm_engine_prefills", "Prompt forwards run (KV copies of cached voices not counted).",
                                  value=stats.get("prefills", 0))
        yield CounterMetricFamily("csm_engine_prefill_rows", "Prompt rows (positions) forwarded.",
                                  value=stats.get("prefill_rows", 0))
        wm = self.watermark.stats() if self.watermark is not None else {}
        yield CounterMetricFamily("csm_watermark_batches", "Batches the watermark encoder ran.",
                                  value=wm.get("batches", 0))
        yield CounterMetricFamily("csm_watermark_pieces", "Audio pieces watermarked in those batches.",
                                  value=wm.get("pieces", 0))
        yield CounterMetricFamily("csm_watermark_busy_seconds", "Seconds the watermark encoder spent on batches.",
                                  value=wm.get("busy_seconds", 0.0))

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily: nothing to check for name clashes at registration


_ENGINE = _EngineCollector()
REGISTRY.register(_ENGINE)


def bind_engine(engine: _HasStats | None) -> None:
    """Point the engine gauges at `engine` (the app does this at startup)."""
    _ENGINE.engine = engine


def bind_app_state(admission: _HasStats | None, sessions: Callable[[], Any] | None) -> None:
    """Point the admission and session gauges at the app's objects (None: unbind)."""
    _ENGINE.admission, _ENGINE.sessions = admission, sessions or (lambda: None)


def bind_watermark(encoder: _HasStats | None) -> None:
    """Point the watermark batch counters at the app's BatchEncoder (None: unbind)."""
    _ENGINE.watermark = encoder


def render() -> bytes:
    return generate_latest(REGISTRY)

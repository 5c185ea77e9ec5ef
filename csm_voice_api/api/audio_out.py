"""Where generated PCM leaves the engine for a response: every route passes it through here.

With watermarking on (the default), audio is watermarked per piece by one StreamWatermarker
per response (per connection for a WebSocket), so the message grid runs on across phrases.
Pieces are one engine chunk long (CSM_WATERMARK_STREAM_CHUNK_MS): nothing is held back, and each
piece re-encodes the part of its message period heard so far (look-behind). Whole files use the
same pieces, so a streamed response and a whole one of the same seed stay byte-identical.
`WatermarkScope` makes the app's watermark every request's default (and the lifespan makes it
the default of background tasks started after it), so a route gets it without passing it
along, and a new route cannot forget it.

Pieces run on the app's `WatermarkWorkers` (CSM_WATERMARK_WORKERS threads, apart from asyncio's
default pool). In the server each worker hands its piece to the app's `BatchEncoder`
(audio/watermark_batch.py), which marks the pieces of all streams waiting at that moment in one
batch on its own CUDA stream, so the workers mostly wait and the watermark's cost per piece falls
as the load grows. Without an encoder (tools, tests) a worker marks its piece itself. A chunk
that ends no piece (most chunks, once a stream's pieces have grown) is only added to its piece, on
the event loop: a thread hop per chunk cost more than the append (2.5x fewer hops under load).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from starlette.types import ASGIApp, Receive, Scope, Send

from csm_voice_api.api import metrics
from csm_voice_api.api.playout import RECENT, Playout

if TYPE_CHECKING:
    from csm_voice_api.audio.watermark import StreamWatermarker, Watermarker
    from csm_voice_api.audio.watermark_batch import BatchEncoder

T = TypeVar("T")
DEFAULT_WORKERS = 4  # outside an app (tools, tests), where pieces are marked one by one


class WatermarkWorkers:
    """A bounded pool of threads for watermark work, timed per call (watermark_wait,
    watermark_compute and loop_lag in csm_stage_seconds)."""

    def __init__(self, workers: int = DEFAULT_WORKERS):
        if workers < 1:
            raise ValueError("the watermark needs at least one worker thread")
        self.workers = workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="csm-watermark")

    async def run(self, fn: Callable[[], T], *, timed: bool = True) -> T:
        if not timed:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn)
        submitted = time.perf_counter()

        def call() -> tuple[T, float, float]:
            started = time.perf_counter()
            out = fn()
            return out, started, time.perf_counter()

        out, started, ended = await asyncio.get_running_loop().run_in_executor(self._pool, call)
        metrics.observe("loop_lag", time.perf_counter() - ended)
        metrics.observe("watermark_wait", started - submitted)
        metrics.observe("watermark_compute", ended - started)
        return out

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_DEFAULT_WORKERS: WatermarkWorkers | None = None
_DEFAULT_LOCK = threading.Lock()


def _default_workers() -> WatermarkWorkers:
    global _DEFAULT_WORKERS
    with _DEFAULT_LOCK:
        if _DEFAULT_WORKERS is None:
            _DEFAULT_WORKERS = WatermarkWorkers(DEFAULT_WORKERS)
        return _DEFAULT_WORKERS


@dataclass(frozen=True)
class ResponseWatermark:
    """The app's watermarker, the piece length of responses and the threads that mark them."""

    watermarker: Watermarker
    chunk_s: float
    workers: WatermarkWorkers | None = None  # None: a process-wide pool of DEFAULT_WORKERS
    growth: float = 1.0  # each piece this much longer than the last, up to a message period
    encoder: BatchEncoder | None = None  # marks pieces of all streams in batches; None: one by one

    def stream(self) -> StreamWatermarker:
        if self.encoder is None:
            return self.watermarker.stream(self.chunk_s, self.growth)
        return self.watermarker.stream(self.chunk_s, self.growth, self.encoder.apply, self.encoder.apply_first)

    def apply(self, pcm: np.ndarray) -> np.ndarray:
        """One whole piece marked the way this server's streams mark theirs."""
        return (self.watermarker if self.encoder is None else self.encoder).apply(pcm)


_CURRENT: ContextVar[ResponseWatermark | None] = ContextVar("csm_response_watermark", default=None)


def set_app_watermark(current: ResponseWatermark | None) -> None:
    """Makes `current` the default in this context: the app's lifespan calls it, so background
    tasks started by later lifespans (job workers) inherit it like requests do."""
    _CURRENT.set(current)


def response_watermark() -> StreamWatermarker | None:
    """A fresh stream watermarker for one response of the current request; None when off."""
    current = _CURRENT.get()
    return None if current is None else current.stream()


class WatermarkScope:
    """ASGI middleware: within each request and WebSocket, app.state.watermark is the default."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        token = _CURRENT.set(getattr(scope["app"].state, "watermark", None))
        try:
            await self.app(scope, receive, send)
        finally:
            _CURRENT.reset(token)


async def watermarked(pcms: AsyncIterator[np.ndarray], wm: StreamWatermarker | None) -> AsyncIterator[np.ndarray]:
    """`pcms` watermarked (same total length), flushed when `pcms` ends; one response's audio, or
    one phrase's on a WebSocket: it is played back against a listener (api/playout.py), and audio
    ready late counts as a stall.

    If the consumer stops early or `pcms` fails, audio not yet handed out is dropped, so the
    stream goes on from what was returned. silentcipher blocks for milliseconds (GPU) to a good
    part of a second (CPU): it runs on the app's watermark workers, never on the event loop.
    """
    playout = Playout()
    async with aclosing(_watermarked(pcms, wm)) as pieces:
        async for out in pieces:
            stall = playout.ready(out.size)
            if stall > 0:
                RECENT.record(stall)
            handed = time.perf_counter()
            yield out
            playout.handed_over(time.perf_counter() - handed)


async def _watermarked(pcms: AsyncIterator[np.ndarray], wm: StreamWatermarker | None) -> AsyncIterator[np.ndarray]:
    if wm is None:
        async with aclosing(pcms) as source:  # type: ignore[type-var]
            async for pcm in source:
                yield pcm
        return
    current = _CURRENT.get()
    workers = current.workers if current is not None and current.workers is not None else _default_workers()
    # A new utterance on this stream: its first piece is small again (no write of the stream's
    # last utterance runs any more: it flushed, or its discard ran after its last write).
    wm.restart()
    ended = False
    try:
        async with aclosing(pcms) as source:  # type: ignore[type-var]
            async for pcm in source:
                if wm.buffer(pcm):  # no piece ends in it: nothing to mark yet, no thread hop
                    continue
                out = await workers.run(lambda pcm=pcm: wm.write(pcm))
                if out.size:
                    yield out
        ended = True
        if wm.pending:  # pieces of one engine chunk usually leave nothing: no thread hop then
            tail = await workers.run(wm.flush)
            yield tail
    finally:
        if not ended:
            # In a worker too: a write cancelled above may still be running there (the stream
            # serialises its calls), and the next phrase on this stream must wait for both.
            await workers.run(wm.discard, timed=False)

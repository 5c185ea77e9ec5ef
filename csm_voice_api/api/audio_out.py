"""Where generated PCM leaves the engine for a response: every route passes it through here.

With watermarking on (the default), audio is watermarked per piece by one StreamWatermarker
per response (per connection for a WebSocket), so the message grid runs on across phrases.
Pieces are one engine chunk long (CSM_WATERMARK_STREAM_CHUNK_MS): nothing is held back, and each
piece re-encodes the part of its message period heard so far (look-behind). Whole files use the
same pieces, so a streamed response and a whole one of the same seed stay byte-identical.
`WatermarkScope` makes the app's watermark every request's default (and the lifespan makes it
the default of background tasks started after it), so a route gets it without passing it
along, and a new route cannot forget it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from csm_voice_api.audio.watermark import StreamWatermarker, Watermarker


@dataclass(frozen=True)
class ResponseWatermark:
    """The app's watermarker and the piece length of responses."""

    watermarker: Watermarker
    chunk_s: float

    def stream(self) -> StreamWatermarker:
        return self.watermarker.stream(self.chunk_s)


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
    """`pcms` watermarked (same total length), flushed when `pcms` ends.

    If the consumer stops early or `pcms` fails, audio not yet handed out is dropped, so the
    stream goes on from what was returned. silentcipher blocks for milliseconds (GPU) to a good
    part of a second (CPU): it runs in a worker thread, never on the event loop.
    """
    if wm is None:
        async with aclosing(pcms) as source:  # type: ignore[type-var]
            async for pcm in source:
                yield pcm
        return
    ended = False
    try:
        async with aclosing(pcms) as source:  # type: ignore[type-var]
            async for pcm in source:
                out = await asyncio.to_thread(wm.write, pcm)
                if out.size:
                    yield out
        ended = True
        tail = await asyncio.to_thread(wm.flush)
        if tail.size:
            yield tail
    finally:
        if not ended:
            # In a thread too: a write cancelled above may still be running there (the stream
            # serialises its calls), and the next phrase on this stream must wait for both.
            await asyncio.to_thread(wm.discard)

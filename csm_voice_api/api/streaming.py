"""Streamed audio responses shared by every route that streams."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


async def respond_stream(chunks: AsyncIterator[bytes], media_type: str) -> Response:
    """A streamed response that starts once the first bytes exist, so errors raised before any
    audio (no slot, context overflow, unknown session) still get their status code instead of a
    broken 200 stream."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""
    except BaseException:
        await chunks.aclose()  # type: ignore[attr-defined]
        raise
    return ClosingStream(_prepend(first, chunks), media_type=media_type)


async def _prepend(first: bytes, rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        if first:
            yield first
        async for b in rest:
            if b:
                yield b
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


class ClosingStream(StreamingResponse):
    """Closes its generator as soon as the response ends, so a client that left aborts the engine
    work now rather than whenever the generator is garbage collected."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]

"""WS /v1/ws/stream-text/{session_id}: text streams in, the session's voice streams out.

Client frames (JSON text): {"text_chunk": "...", "is_final": false}, {"flush": true}, {"cancel": true}.
Server frames: binary audio (one continuous stream in the session's format: a WAV stream has a
single header with unknown length; mp3/opus streams end at each `done` and a new one starts with
the next audio), and JSON events: segment.start, segment.done, done, cancelled, error.

One `StreamTextConnection` per socket owns a receive task (parses frames, segments text into
phrases, queues them) and a speak task (speaks queued phrases in order), so audio of phrase 1
flows while phrase 2 is still being typed. Closing the socket cancels both, which aborts the
engine work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, WebSocket
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.websockets import WebSocketDisconnect, WebSocketState

from csm_voice_api.api import metrics
from csm_voice_api.api.audio_out import response_watermark, watermarked
from csm_voice_api.api.sessions import get_sessions
from csm_voice_api.api.speech_job import turn_cap_ms
from csm_voice_api.audio.encode import Encoder, make_encoder
from csm_voice_api.engine.types import FRAME_MS
from csm_voice_api.errors import CsmError, EngineDead, SessionNotFound
from csm_voice_api.sessions.manager import Session, SessionManager

log = logging.getLogger(__name__)
router = APIRouter()

CLOSE_UNKNOWN_SESSION = 4404
CLOSE_SESSION_BUSY = 4409


class ClientFrame(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text_chunk: str | None = None
    is_final: bool = False
    flush: bool = False
    cancel: bool = False


class SegmentStart(BaseModel):
    type: Literal["segment.start"] = "segment.start"
    segment: int
    text: str


class SegmentDone(BaseModel):
    type: Literal["segment.done"] = "segment.done"
    segment: int
    audio_ms: int
    frames: int
    stop_reason: str | None  # "eos", "max_length", "aborted", "cancelled", "error"


class Done(BaseModel):
    type: Literal["done"] = "done"


class Cancelled(BaseModel):
    type: Literal["cancelled"] = "cancelled"


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    message: str
    code: str | None = None


@dataclass
class _Phrase:
    text: str
    epoch: int


@dataclass
class _Marker:
    kind: Literal["done", "cancelled"]
    epoch: int


class _Superseded(Exception):
    """A phrase's audio arrived after a cancel: drop it."""


@dataclass
class _Progress:
    segment: int
    frames: int = 0
    stop_reason: str | None = None


@router.websocket("/v1/ws/stream-text/{session_id}")
async def stream_text_ws(websocket: WebSocket, session_id: str) -> None:
    settings = websocket.app.state.settings
    conn = StreamTextConnection(websocket, get_sessions(websocket), session_id,
                                chunk_frames=settings.chunk_frames, max_chunk_chars=settings.max_text_chars)
    await conn.handle_connection()


class StreamTextConnection:
    """One WebSocket: its receive loop, its speak loop, send/send_error, and cleanup()."""

    def __init__(self, websocket: WebSocket, sessions: SessionManager, session_id: str, *,
                 chunk_frames: int = 2, max_chunk_chars: int = 4096):
        self.ws = websocket
        self.sessions = sessions
        self.session_id = session_id
        self.chunk_frames = chunk_frames
        self.max_chunk_chars = max_chunk_chars
        self.session: Session | None = None
        self.queue: asyncio.Queue[_Phrase | _Marker] = asyncio.Queue()
        self.epoch = 0  # bumped by cancel: queued items and audio of older epochs are dropped
        self.encoder: Encoder | None = None
        self.utterance: asyncio.Task | None = None
        self._getter: asyncio.Task | None = None
        self._tasks: list[asyncio.Task] = []
        self._send_lock = asyncio.Lock()
        self._text_arrived = asyncio.Event()
        # One watermark stream per socket: its message grid runs on across phrases.
        self.watermark = response_watermark()

    # ---- lifecycle ---------------------------------------------------------------------------
    async def handle_connection(self) -> None:
        await self.ws.accept()
        try:
            session = self.sessions.get(self.session_id)
        except SessionNotFound as e:
            await self.ws.close(CLOSE_UNKNOWN_SESSION, e.message[:120])
            return
        if session.lock.locked():
            await self.ws.close(CLOSE_SESSION_BUSY, "Session is busy: another connection is streaming to it.")
            return
        await session.lock.acquire()  # free: returns at once
        self.session = session
        session.websocket = True
        session.attached += 1
        try:
            await self._run()
        finally:
            await self.cleanup()

    async def _run(self) -> None:
        assert self.session is not None
        receive = asyncio.create_task(self.receive_loop(), name="ws-receive")
        speak = asyncio.create_task(self.speak_loop(), name="ws-speak")
        closed = asyncio.create_task(self.session.closed.wait(), name="ws-session-closed")
        self._tasks = [receive, speak, closed]
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        if closed in done:
            await self._close(1000, "Session closed.")
            return
        for task in done:
            exc = task.exception()
            if isinstance(exc, EngineDead):
                await self.send_error(str(exc), code="engine_dead")
                await self._close(1011, "The speech engine stopped; the server must be restarted.")
            elif exc is not None and not isinstance(exc, WebSocketDisconnect):
                log.error("stream-text connection failed", exc_info=exc)
                await self._close(1011, "Internal error.")

    async def cleanup(self) -> None:
        """Stop everything this connection started (aborting engine work) and free the session."""
        tasks = [t for t in (*self._tasks, self.utterance, self._getter) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with suppress(BaseException):
                await t
        if self.encoder is not None:
            self.encoder.close()
            self.encoder = None
        if self.session is not None:
            self.session.segmenter.clear()  # the text stream is gone: its unspoken rest too
            self.session.websocket = False
            self.session.attached -= 1
            self.sessions.touch(self.session)
            self.session.lock.release()
            self.session = None

    # ---- receiving ---------------------------------------------------------------------------
    async def receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self.send_error("Binary frames are not accepted: send JSON text frames.", code="invalid_frame")
                continue
            try:
                frame = ClientFrame.model_validate_json(text)
            except ValidationError as e:
                await self.send_error(_frame_error(e), code="invalid_frame")
                continue
            if frame.text_chunk is not None and len(frame.text_chunk) > self.max_chunk_chars:
                await self.send_error(f"text_chunk is over {self.max_chunk_chars} characters.", code="too_long")
                continue
            self.handle_frame(frame)

    def handle_frame(self, frame: ClientFrame) -> None:
        assert self.session is not None
        self.sessions.touch(self.session)
        if frame.cancel:
            self.cancel()
        seg = self.session.segmenter
        self._text_arrived.set()
        phrases = seg.push(frame.text_chunk or "", final=frame.is_final or frame.flush, now=time.monotonic())
        for p in phrases:
            self.queue.put_nowait(_Phrase(p, self.epoch))
        if frame.is_final:
            self.queue.put_nowait(_Marker("done", self.epoch))

    def cancel(self) -> None:
        """Drop buffered and queued text and stop the phrase being spoken (its audio stops now)."""
        assert self.session is not None
        self.epoch += 1
        self.session.segmenter.clear()
        while not self.queue.empty():
            self.queue.get_nowait()
        if self.utterance is not None and not self.utterance.done():
            self.utterance.cancel()
        self.queue.put_nowait(_Marker("cancelled", self.epoch))

    # ---- speaking ----------------------------------------------------------------------------
    async def speak_loop(self) -> None:
        while True:
            item = await self._next_item()
            if item.epoch != self.epoch:
                continue
            if isinstance(item, _Marker):
                if item.kind == "done":
                    await self._end_stream()
                    await self.send(Done())
                else:
                    await self.send(Cancelled())
                continue
            progress = _Progress(self.session.next_segment())  # type: ignore[union-attr]
            self.utterance = asyncio.create_task(self._speak(item, progress), name="ws-utterance")
            await asyncio.wait([self.utterance])
            if self.utterance.cancelled():
                progress.stop_reason = "cancelled"
            elif (exc := self.utterance.exception()) is not None:
                if not isinstance(exc, CsmError):
                    raise exc
                progress.stop_reason = "error"
                await self.send_error(exc.message, code=exc.code)
            self.utterance = None
            await self.send(SegmentDone(segment=progress.segment, audio_ms=progress.frames * FRAME_MS,
                                        frames=progress.frames, stop_reason=progress.stop_reason))

    async def _speak(self, phrase: _Phrase, progress: _Progress) -> None:
        assert self.session is not None
        await self.send(SegmentStart(segment=progress.segment, text=phrase.text))
        try:
            async with aclosing(watermarked(self._pcm(phrase, progress), self.watermark)) as pcms:
                async for pcm in pcms:
                    data = self._encoder().write(pcm)
                    if data:
                        await self.send_bytes(data)
        except _Superseded:
            progress.stop_reason = "cancelled"

    async def _pcm(self, phrase: _Phrase, progress: _Progress) -> AsyncIterator[np.ndarray]:
        assert self.session is not None
        gen = self.sessions.speak(self.session, phrase.text, chunk_frames=self.chunk_frames,
                                  max_audio_ms=turn_cap_ms(phrase.text))
        async with aclosing(metrics.engine_timed(gen)) as chunks:
            async for chunk in chunks:
                if phrase.epoch != self.epoch:  # cancelled while this chunk was on its way
                    raise _Superseded  # not a plain end: the watermark must not flush its rest
                if chunk.frames:
                    progress.frames += chunk.frames
                    yield chunk.pcm
                if chunk.done:
                    progress.stop_reason = chunk.stop_reason

    async def _next_item(self) -> _Phrase | _Marker:
        """The next queued item; meanwhile, speaks buffered text once the client paused long enough."""
        assert self.session is not None
        seg = self.session.segmenter
        while True:
            if self._getter is None:
                self._getter = asyncio.create_task(self.queue.get())
            # New text moves the idle deadline (or creates one): wake up to recompute it.
            self._text_arrived.clear()
            waker = asyncio.create_task(self._text_arrived.wait())
            try:
                await asyncio.wait([self._getter, waker], timeout=seg.deadline(time.monotonic()),
                                   return_when=asyncio.FIRST_COMPLETED)
            finally:
                waker.cancel()
            if self._getter.done():
                item, self._getter = self._getter.result(), None
                return item
            for p in seg.poll_idle(time.monotonic()):
                self.queue.put_nowait(_Phrase(p, self.epoch))

    def _encoder(self) -> Encoder:
        if self.encoder is None:
            assert self.session is not None
            self.encoder = metrics.TimedEncoder(make_encoder(self.session.output_format))
        return self.encoder

    async def _end_stream(self) -> None:
        """At `done`: a WAV stream gets its header if no audio came yet; mp3/opus end their stream."""
        enc = self._encoder()
        data = enc.flush()
        if self.session is not None and self.session.output_format in ("mp3", "opus"):
            enc.close()
            self.encoder = None
        if data:
            await self.send_bytes(data)

    # ---- sending -----------------------------------------------------------------------------
    async def send(self, event: BaseModel) -> None:
        await self.send_json(event.model_dump())

    async def send_json(self, payload: dict[str, Any]) -> None:
        async with self._send_lock:
            await self.ws.send_json(payload)

    async def send_bytes(self, data: bytes) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(data)

    async def send_error(self, message: str, *, code: str | None = None) -> None:
        with suppress(WebSocketDisconnect, RuntimeError):
            await self.send(ErrorEvent(message=message, code=code))

    async def _close(self, code: int, reason: str) -> None:
        if self.ws.application_state is WebSocketState.CONNECTED:
            with suppress(WebSocketDisconnect, RuntimeError):
                await self.ws.close(code, reason)


def _frame_error(e: ValidationError) -> str:
    first = e.errors()[0]
    if first["type"] == "json_invalid":
        return "Frames must be JSON objects like {\"text_chunk\": \"Hello\", \"is_final\": false}."
    if first["type"] == "extra_forbidden":
        field = ".".join(str(p) for p in first["loc"])
        return f"Unknown field '{field}': frames carry text_chunk, is_final, flush or cancel."
    where = ".".join(str(p) for p in first["loc"]) or "frame"
    return f"{where}: {first['msg']}. Frames carry text_chunk (string), is_final, flush, cancel (booleans)."

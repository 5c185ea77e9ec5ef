"""Admission control, slow-client drops and graceful shutdown.

`AdmissionMiddleware` counts generations in flight (every POST but the ticket and queue routes:
speech, voice-clone, stream-text, conversation, scenes, compat /generate, session and voice
creation) and refuses one over capacity with 429 + Retry-After before its body is parsed, decoded
or sent to the engine. The count drops when the response ends, however it ends, so a client that
leaves frees its place at once. A connected streaming WebSocket takes a place too, for as long as
it is open: its session was admitted when it was created, and its phrases are never refused, so
the places left for new work are what is left beside it (else a session's next phrase would wait
for an engine slot behind requests admitted after it).

Capacity is also what the GPU keeps in real time (`RealtimeLimit`): each decode step gives every
generating stream one 80 ms frame, so while recent steps take longer than the limit (35 ms on a
GPU by default: streams at 2.3x real time, headroom for the watermark's growing pieces and for the
jitter of a busy host; on an H200, 32 mixed clients ran at 23 ms per step within a 0.2 s stall
p99: BENCHMARKS.md), one more stream would slow all of them, and new generations get 429 until
steps are fast again. And while a stream accepted earlier stalled lately (its listener waited
longer than 200 ms for audio within the last 5 s, api/playout.py: what the listener hears, so it
also catches the watermark or the event loop falling behind, which the step time does not see),
new generations get 429 too. Streams already accepted go on, and so do the later phrases of an open
WebSocket session: refusing one mid-conversation would lose it (making them wait for headroom
was measured worse: a second segment of a turn then stalls).

A client that stops reading blocks our `send` (TCP flow control); after `send_timeout_s` its
send fails like a disconnect, which aborts the engine work and frees the slot.

On SIGTERM, `GracefulServer` drains: /ready answers 503, new work gets 503, in-flight HTTP streams
run to their end and each WebSocket closes with 1001 once its current phrase is done (or when the
grace period runs out); then uvicorn stops and the process exits 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from collections.abc import Callable
from types import FrameType

import anyio
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csm_voice_api.api import metrics
from csm_voice_api.api.errors import csm_error_response, error_response
from csm_voice_api.api.playout import RECENT, RecentStalls
from csm_voice_api.engine.types import FRAME_MS
from csm_voice_api.errors import Overloaded

log = logging.getLogger(__name__)

# POSTs that start no generation now: a ticket, and queue submissions (the queue's worker
# generates later, within capacity; refusing them would defeat the queue).
EXEMPT_POSTS = ("/v1/ws-ticket", "/v1/queue/")
CLOSE_GOING_AWAY = 1001
RETRY_AFTER_S = 1.0
DEFAULT_GPU_STEP_LIMIT_MS = 35.0  # CSM_REALTIME_STEP_MS unset on a GPU (off on CPU: a demo, not real time)
DEFAULT_GPU_STALL_LIMIT_MS = 200.0  # CSM_REALTIME_STALL_MS unset on a GPU: the stall p99 bench/load.py holds to


class SendTimeout(OSError):
    """The client read nothing for send_timeout_s: treated like a disconnect (Starlette maps OSError so)."""


def is_generation(scope: Scope) -> bool:
    return scope["method"] == "POST" and not scope["path"].startswith(EXEMPT_POSTS)


class RealtimeLimit:
    """Whether the streams have real-time headroom for one more: from the engine's step time (a
    step is one frame of every stream), and from what listeners heard (a stream accepted earlier
    stalled lately: api/playout.py), which also catches the watermark or the event loop falling behind."""

    def __init__(self, stats: Callable[[], dict], limit_ms: Callable[[], float],
                 stall_limit_ms: Callable[[], float] = lambda: 0.0, stalls: RecentStalls = RECENT):
        self.stats = stats  # the engine's stats(): "active" streams and "step_ms", its recent step period
        self.limit_ms = limit_ms  # 0: no limit
        self.stall_limit_ms = stall_limit_ms  # 0: no limit
        self.stalls = stalls

    def refusal(self) -> Overloaded | None:
        return self._step_refusal() or self._stall_refusal()

    def _step_refusal(self) -> Overloaded | None:
        limit = self.limit_ms()
        if limit <= 0:
            return None
        s = self.stats()
        step = s.get("step_ms")
        if not s.get("active") or step is None or step <= limit:
            return None
        return _realtime_limit(
            f"The server is at its real-time limit: a decode step takes {step:.0f} ms for its {s['active']} "
            f"streams (limit {limit:.0f} ms; one step is one {FRAME_MS:.0f} ms frame of each), so another "
            "stream would slow them all. Retry after the time in Retry-After.")

    def _stall_refusal(self) -> Overloaded | None:
        limit = self.stall_limit_ms()
        if limit <= 0:
            return None
        worst = 1e3 * self.stalls.worst()
        if worst <= limit:
            return None
        return _realtime_limit(
            f"The server is behind real time: a stream's listener waited {worst:.0f} ms for audio within the "
            f"last {self.stalls.window_s:.0f} s (limit {limit:.0f} ms), so new streams wait until the ones "
            "running keep up. Retry after the time in Retry-After.")


def _realtime_limit(message: str) -> Overloaded:
    exc = Overloaded(message, retry_after=RETRY_AFTER_S)
    exc.code = "realtime_limit"
    return exc


class Admission:
    """In-flight generations vs capacity, open WebSockets, and the draining flag."""

    def __init__(self, capacity: Callable[[], int], send_timeout_s: float = 30.0,
                 realtime: RealtimeLimit | None = None):
        self.capacity = capacity
        self.send_timeout_s = send_timeout_s
        self.realtime = realtime
        self.inflight = 0
        self.refused = 0
        self.draining = False
        self.websockets: set[_Socket] = set()

    def refusal(self) -> Overloaded | None:
        """Why a new generation must wait now (all places taken, or no real-time headroom), or None."""
        capacity = self.capacity()
        if self.inflight + len(self.websockets) >= capacity:
            return Overloaded(f"All {capacity} generation places are busy ({self.inflight} requests, "
                              f"{len(self.websockets)} streaming sessions connected); retry after the time in "
                              "Retry-After.", retry_after=RETRY_AFTER_S)
        return None if self.realtime is None else self.realtime.refusal()

    def stats(self) -> dict:
        return {"inflight": self.inflight, "capacity": self.capacity(), "websockets": len(self.websockets),
                "refused": self.refused, "draining": self.draining}

    async def drain(self, grace_s: float) -> None:
        """Stop taking work, let what runs finish (at most grace_s), close WebSockets with 1001."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        log.info("draining: %d generations, %d websockets, %.0f s grace", self.inflight, len(self.websockets), grace_s)
        for ws in list(self.websockets):
            await ws.close_when_idle()
        while (self.inflight or self.websockets) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for ws in list(self.websockets):
            await ws.close("The server is shutting down.")


class AdmissionMiddleware:
    def __init__(self, app: ASGIApp, admission: Admission):
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_generation(scope):
            await self._generation(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _generation(self, scope: Scope, receive: Receive, send: Send) -> None:
        adm = self.admission
        if adm.draining:
            metrics.REJECTIONS.labels(reason="shutting_down").inc()
            await _discard_body(receive, adm.send_timeout_s)
            await _shutting_down()(scope, receive, send)
            return
        exc = adm.refusal()
        if exc is not None:
            adm.refused += 1
            await _discard_body(receive, adm.send_timeout_s)
            await csm_error_response(exc)(scope, receive, send)
            return
        adm.inflight += 1
        try:
            await self.app(scope, receive, _timed(send, adm.send_timeout_s))
        except BaseException as exc:
            if not _only_send_timeouts(exc):
                raise
            log.warning("dropped a client that read nothing for %.0f s (%s)", adm.send_timeout_s, scope["path"])
        finally:
            adm.inflight -= 1

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        adm = self.admission
        if adm.draining:
            metrics.REJECTIONS.labels(reason="shutting_down").inc()
            await send({"type": "websocket.close", "code": CLOSE_GOING_AWAY, "reason": "Shutting down."})
            return
        sock = _Socket(receive, send, adm.send_timeout_s)
        adm.websockets.add(sock)
        try:
            await self.app(scope, sock.receive, sock.send)
        finally:
            adm.websockets.discard(sock)


async def _discard_body(receive: Receive, timeout_s: float) -> None:
    """Read the refused request's body and drop it, chunk by chunk (memory stays flat). Closing a
    socket with unread data makes TCP reset it, and the client would never see our 429."""
    try:
        with anyio.fail_after(timeout_s):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
    except TimeoutError:
        return


def _shutting_down():
    return error_response("The server is shutting down; retry on another instance or after restart.",
                          status=503, code="shutting_down",
                          headers={"Retry-After": str(int(RETRY_AFTER_S))})


# Messages that carry a response's bytes, and the stage their send time is recorded under.
_SEND_STAGES = {"http.response.body": "send_http", "websocket.send": "send_ws"}


def _timed(send: Send, timeout_s: float) -> Send:
    async def timed_send(message: Message) -> None:
        stage = _SEND_STAGES.get(message["type"])
        started = time.perf_counter()
        try:
            with anyio.fail_after(timeout_s):
                await send(message)
        except TimeoutError:
            raise SendTimeout(f"the client read nothing for {timeout_s:.0f} s") from None
        if stage is not None:
            metrics.observe(stage, time.perf_counter() - started)

    return timed_send


class _Socket:
    """One WebSocket as the middleware sees it: sends are timed and serialised, and it can be closed
    from outside (drain). It is busy between a `segment.start` and its `segment.done` event."""

    def __init__(self, receive: Receive, send: Send, timeout_s: float):
        self._receive = receive
        self._send = _timed(send, timeout_s)
        self._lock = asyncio.Lock()
        self._closed = asyncio.Event()
        self._close_when_idle = False
        self.busy = 0

    async def receive(self) -> Message:
        if self._closed.is_set():
            return {"type": "websocket.disconnect", "code": CLOSE_GOING_AWAY}
        recv = asyncio.ensure_future(self._receive())
        closed = asyncio.ensure_future(self._closed.wait())
        try:
            await asyncio.wait((recv, closed), return_when=asyncio.FIRST_COMPLETED)
        finally:
            closed.cancel()
        if recv.done():
            return recv.result()
        recv.cancel()
        return {"type": "websocket.disconnect", "code": CLOSE_GOING_AWAY}

    async def send(self, message: Message) -> None:
        if self._closed.is_set():
            raise OSError("the server closed this socket")
        async with self._lock:
            await self._send(message)
        if message["type"] == "websocket.close":
            self._closed.set()
        elif message.get("text"):
            self._track(message["text"])
            if self._close_when_idle and not self.busy:
                await self.close("The server is shutting down.")

    def _track(self, text: str) -> None:
        if not text.startswith('{"type":"segment.'):
            return
        kind = json.loads(text).get("type")
        self.busy += 1 if kind == "segment.start" else -1 if kind == "segment.done" else 0
        self.busy = max(self.busy, 0)

    async def close_when_idle(self) -> None:
        self._close_when_idle = True
        if not self.busy:
            await self.close("The server is shutting down.")

    async def close(self, reason: str) -> None:
        if self._closed.is_set():
            return
        self._closed.set()  # first: the app's pending receive returns a disconnect now
        try:
            with anyio.fail_after(1.0):  # asyncio.timeout needs Python 3.11
                async with self._lock:
                    await self._send({"type": "websocket.close", "code": CLOSE_GOING_AWAY, "reason": reason})
        except (OSError, TimeoutError, RuntimeError):
            pass  # already gone, or never accepted


class GracefulServer(uvicorn.Server):
    """uvicorn, but SIGTERM drains first (see the module docstring) and then exits 0."""

    def __init__(self, config: uvicorn.Config, admission: Admission, grace_s: float):
        super().__init__(config)
        self.admission = admission
        self.grace_s = grace_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:  # noqa: ANN001 - uvicorn's signature
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_task is None and self._loop is not None and self.started:
            # Not recorded as a captured signal: uvicorn would re-raise it after shutdown (exit 143).
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        if self._drain_task is None:
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        try:
            await self.admission.drain(self.grace_s)
        finally:
            self.should_exit = True


def _only_send_timeouts(exc: BaseException) -> bool:
    """A SendTimeout, or an exception group (task groups wrap errors) made only of them.

    Written out because `except*` needs Python 3.11 and we support 3.10.
    """
    if isinstance(exc, SendTimeout):
        return True
    inner = getattr(exc, "exceptions", None)
    return isinstance(inner, (list, tuple)) and bool(inner) and all(_only_send_timeouts(e) for e in inner)

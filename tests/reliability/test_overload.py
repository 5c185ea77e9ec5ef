"""Admission control, client disconnects and clients that stop reading, against a live server."""

from __future__ import annotations

import json
import socket
import time
from contextlib import aclosing

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect

from csm_voice_api.api import audio_out
from csm_voice_api.api.admission import RETRY_AFTER_S, RealtimeLimit, is_generation
from csm_voice_api.api.playout import RECENT, RecentStalls

from ..api.test_playout import Clock
from .conftest import engine_idle, eventually, serve

LONG = ("This sentence is long enough to keep the engine busy for a good while, and then some more. " * 3).strip()
STREAM = {"input": LONG, "voice": "alloy", "response_format": "pcm", "max_audio_length_ms": 60_000}


def rejections(url: str, reason: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(f'csm_rejections_total{{reason="{reason}"}}'):
            return float(line.split()[-1])
    return 0.0


def _speech_request(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/audio/speech HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)


async def test_over_capacity_is_refused_before_any_decoding_and_the_slot_comes_back(engine, tmp_path):
    # The held request's client never reads and the socket buffers are small: it stays in flight
    # (the demo engine would otherwise finish a minute of audio in seconds).
    with serve(engine, tmp_path, sndbuf=4096, max_inflight=1, send_timeout_s=120) as live:
        before = rejections(live.url, "overloaded")
        held = _never_reading_socket(live.url, _speech_request({**STREAM, "max_audio_length_ms": 90_000}))
        try:
            await eventually(lambda: live.admission.inflight == 1, what="held request admitted")
            async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
                # Garbage audio would be a 415 if it were decoded: it is refused before that.
                r = await c.post("/v1/voice-clone", data={"text": "Hi."},
                                 files={"audio_file": ("a.wav", b"garbage" * 1000, "audio/wav")})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"
                assert r.json()["error"]["code"] == "overloaded"
                for _ in range(2):  # the refused connection stays usable (its body was drained)
                    assert (await c.post("/v1/audio/speech", json={**STREAM, "stream": False})).status_code == 429
                assert (await c.get("/v1/models")).status_code == 200  # reads are not admitted
        finally:
            held.close()
        # The held client went away mid-audio: its GPU work stops and its place frees.
        await eventually(lambda: live.admission.inflight == 0 and engine_idle(engine), what="slot freed")
        r = httpx.post(live.url + "/v1/audio/speech", json={**STREAM, "max_audio_length_ms": 240, "stream": False},
                       timeout=60)
        assert r.status_code == 200
        assert rejections(live.url, "overloaded") == before + 3


async def test_a_connected_streaming_session_holds_a_place_and_its_phrases_go_on(engine, tmp_path):
    # Two places: the session's creation takes one while it runs, its WebSocket one while open.
    with serve(engine, tmp_path, max_inflight=2) as live:
        sid = live.open_session()
        speech = {**STREAM, "max_audio_length_ms": 240, "stream": False}
        async with connect(f"{live.ws_url}/v1/ws/stream-text/{sid}") as ws:
            await eventually(lambda: len(live.admission.websockets) == 1, what="socket counted")
            held = _never_reading_socket(live.url, _speech_request({**STREAM, "max_audio_length_ms": 90_000}))
            try:
                await eventually(lambda: live.admission.inflight == 1, what="held request admitted")
                async with httpx.AsyncClient(base_url=live.url, timeout=60) as c:
                    r = await c.post("/v1/audio/speech", json=speech)
                    assert r.status_code == 429 and r.headers["retry-after"] == "1"
                    assert "1 streaming sessions connected" in r.json()["error"]["message"]
                    # The admitted session is never refused: its phrase is spoken at full capacity.
                    await ws.send(json.dumps({"text_chunk": "Hello there.", "is_final": True}))
                    events, audio = [], 0
                    with anyio.fail_after(60):
                        while not events or events[-1] != "done":
                            msg = await ws.recv()
                            if isinstance(msg, bytes):
                                audio += len(msg)
                            else:
                                events.append(json.loads(msg)["type"])
                    assert audio > 0 and "error" not in events
            finally:
                held.close()
            await eventually(lambda: live.admission.inflight == 0, what="held request gone")
            # The open socket alone leaves one place: a request fits beside it.
            assert httpx.post(live.url + "/v1/audio/speech", json=speech, timeout=60).status_code == 200
        await eventually(lambda: not live.admission.websockets, what="socket gone")
        await eventually(lambda: engine_idle(engine), what="engine idle")


async def test_without_realtime_headroom_new_generations_wait_and_accepted_ones_go_on(engine, tmp_path):
    # Every measured step is over a 0.001 ms limit: while one stream generates, a new one is
    # refused; once the engine is idle, one is admitted again.
    with serve(engine, tmp_path, realtime_step_ms=0.001) as live:
        before = rejections(live.url, "realtime_limit")
        async with httpx.AsyncClient(base_url=live.url, timeout=120) as c:
            body = {**STREAM, "max_audio_length_ms": 8000, "stream": True}
            async with c.stream("POST", "/v1/audio/speech", json=body) as held:
                chunks = held.aiter_bytes()
                audio = [await anext(chunks)]
                await eventually(lambda: engine.stats()["step_ms"] is not None, what="a step period measured")
                assert engine.stats()["active"] == 1
                r = await c.post("/v1/audio/voices", data={"name": "x"},
                                 files={"audio_sample": ("a.wav", b"garbage" * 1000, "audio/wav")})
                assert r.status_code == 429 and r.headers["retry-after"] == "1"  # refused before decoding
                err = r.json()["error"]
                assert err["code"] == "realtime_limit" and "real-time limit" in err["message"]
                audio += [part async for part in chunks]  # the accepted stream runs to its end
            assert held.status_code == 200 and sum(map(len, audio)) > len(audio[0])
        await eventually(lambda: engine_idle(engine), what="engine idle")
        r = httpx.post(live.url + "/v1/audio/speech", json={**STREAM, "max_audio_length_ms": 240, "stream": False},
                       timeout=60)
        assert r.status_code == 200
        assert rejections(live.url, "realtime_limit") == before + 1


def test_stall_limit_policy():
    clock = Clock()
    stalls = RecentStalls(5.0, clock)
    limit = RealtimeLimit(lambda: {"active": 1, "step_ms": 10.0}, lambda: 35.0, lambda: 200.0, stalls)
    assert limit.refusal() is None
    stalls.record(0.15)
    assert limit.refusal() is None  # within the limit
    stalls.record(0.3)
    exc = limit.refusal()
    assert exc is not None and exc.code == "realtime_limit" and exc.retry_after == RETRY_AFTER_S
    assert "waited 300 ms" in exc.message and "behind real time" in exc.message
    clock.t = 5.1
    assert limit.refusal() is None  # the window passed: new streams are admitted again
    stalls.record(0.3)
    assert RealtimeLimit(lambda: {}, lambda: 0.0, lambda: 0.0, stalls).refusal() is None  # 0: off


async def test_while_accepted_streams_stall_new_generations_wait(engine, tmp_path, monkeypatch):
    # A producer that falls behind real time (as a busy watermark does): its stream's listener
    # waits for the third piece (0.8 s late, less what it had buffered). The next generation is
    # refused until the window passes.
    real = audio_out._watermarked

    async def late(pcms, wm):
        n = 0
        async with aclosing(real(pcms, wm)) as pieces:
            async for piece in pieces:
                n += 1
                if n == 3:
                    await anyio.sleep(0.8)
                yield piece

    monkeypatch.setattr(audio_out, "_watermarked", late)
    RECENT.clear()
    with serve(engine, tmp_path, realtime_stall_ms=200, watermark=False) as live:
        before = rejections(live.url, "realtime_limit")
        body = {**STREAM, "max_audio_length_ms": 1200, "stream": True}
        r = httpx.post(live.url + "/v1/audio/speech", json=body, timeout=60)
        assert r.status_code == 200 and RECENT.worst() >= 0.4
        assert stall_count(live.url) >= 1
        r = httpx.post(live.url + "/v1/audio/speech", json=body, timeout=60)
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        err = r.json()["error"]
        assert err["code"] == "realtime_limit" and "behind real time" in err["message"]
        assert rejections(live.url, "realtime_limit") == before + 1
        RECENT.clear()  # as 5 s without stalls would
        monkeypatch.setattr(audio_out, "_watermarked", real)
        assert httpx.post(live.url + "/v1/audio/speech", json=body, timeout=60).status_code == 200
        assert RECENT.worst() == 0


async def test_a_client_that_reads_slowly_is_not_a_stall(engine, tmp_path):
    # The client reads 3 s of audio (144 kB) at a quarter of real time through small socket
    # buffers: once the transport's 64 kB buffer is full the server waits on it, for longer than
    # the audio it sent ahead lasts. That delay is the client's own, not the server's.
    RECENT.clear()
    with serve(engine, tmp_path, sndbuf=4096, realtime_stall_ms=200, watermark=False) as live:
        body = {**STREAM, "max_audio_length_ms": 3000, "stream": True}
        s = _never_reading_socket(live.url, _speech_request(body))
        try:
            received, started = b"", time.monotonic()
            while not received.endswith(b"\r\n0\r\n\r\n"):  # the chunked body's end
                data = await anyio.to_thread.run_sync(s.recv, 1200)
                assert data and time.monotonic() - started < 60
                received += data
                await anyio.sleep(0.1)  # 12 kB/s against 48 kB/s of audio
        finally:
            s.close()
        assert len(received) > 140_000 and RECENT.worst() < 0.1
        assert httpx.post(live.url + "/v1/audio/speech", json={**STREAM, "max_audio_length_ms": 240},
                          timeout=60).status_code == 200


def stall_count(url: str) -> float:
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith("csm_stream_stall_seconds_count"):
            return float(line.split()[-1])
    return 0.0


def test_realtime_limit_policy():
    stats = {"active": 3, "step_ms": 52.0}
    limit = RealtimeLimit(lambda: stats, lambda: 40.0)
    exc = limit.refusal()
    assert exc is not None and exc.code == "realtime_limit" and exc.retry_after == RETRY_AFTER_S
    assert "52 ms" in exc.message and "3 streams" in exc.message
    for quiet in ({"active": 0, "step_ms": 52.0}, {"active": 3, "step_ms": None}, {"active": 3, "step_ms": 40.0}):
        assert RealtimeLimit(lambda q=quiet: q, lambda: 40.0).refusal() is None
    assert RealtimeLimit(lambda: stats, lambda: 0.0).refusal() is None  # 0: off


async def test_websocket_disconnect_aborts_within_a_chunk(live_factory, engine):
    live = live_factory()
    sid = live.open_session()
    async with connect(f"{live.ws_url}/v1/ws/stream-text/{sid}") as ws:
        await ws.send(json.dumps({"text_chunk": LONG, "is_final": True}))
        with anyio.fail_after(60):
            while not isinstance(await ws.recv(), bytes):
                pass
        at_close = engine.stats()["frames_total"]
    await eventually(lambda: engine_idle(engine), what="engine idle after the socket closed")
    # The phrase may run ~25 s (~300 frames): it was cut, not finished (the margin is for a busy CPU).
    assert engine.stats()["frames_total"] - at_close <= 60
    session = live.app.state.sessions.get(sid)
    await eventually(lambda: session.attached == 0, what="session released")


def _never_reading_socket(url: str, request: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").removeprefix("ws://").split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small window: the server stalls soon
    s.connect((host, int(port)))
    s.sendall(request)
    return s


async def test_http_client_that_never_reads_is_dropped_and_its_slot_freed(engine, tmp_path):
    with serve(engine, tmp_path, sndbuf=4096, send_timeout_s=1.0) as live:
        s = _never_reading_socket(live.url, _speech_request({**STREAM, "max_audio_length_ms": 90_000}))
        try:
            await eventually(lambda: live.admission.inflight == 1, what="request admitted")
            await eventually(lambda: live.admission.inflight == 0, timeout=90, what="stalled client dropped")
            await eventually(lambda: engine_idle(engine), what="engine work aborted")
        finally:
            s.close()


async def test_websocket_client_that_never_reads_is_dropped(engine, tmp_path):
    with serve(engine, tmp_path, sndbuf=4096, send_timeout_s=1.0) as live:
        sid = live.open_session()
        session = live.app.state.sessions.get(sid)
        # max_queue=1 with a small receive buffer: the client stops reading from the socket.
        async with connect(f"{live.ws_url}/v1/ws/stream-text/{sid}", max_queue=1, max_size=None) as ws:
            ws.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            await ws.send(json.dumps({"text_chunk": LONG, "is_final": True}))
            await eventually(lambda: session.attached == 1, what="socket attached")
            await eventually(lambda: session.attached == 0, timeout=90, what="stalled socket dropped")
            await eventually(lambda: engine_idle(engine), what="engine work aborted")


@pytest.mark.parametrize(("method", "path", "admitted"), [
    ("POST", "/v1/audio/speech", True), ("POST", "/v1/voice-clone", True), ("POST", "/generate", True),
    ("POST", "/generate_audio", True), ("POST", "/v1/scene", True), ("POST", "/api/v1/audio/conversation", True),
    ("POST", "/v1/streaming-session", True), ("POST", "/v1/audio/voices", True),
    ("POST", "/v1/ws-ticket", False), ("POST", "/v1/queue/speech", False), ("GET", "/v1/models", False),
    ("DELETE", "/v1/streaming-session/x", False),
])  # fmt: skip
def test_which_requests_take_a_generation_place(method, path, admitted):
    assert is_generation({"type": "http", "method": method, "path": path}) is admitted

"""SIGTERM on the real CLI server: readiness drops, in-flight streams finish, sockets close 1001, exit 0."""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from ..live import cli_server


@pytest.fixture
def server(tmp_path: Path):
    with cli_server(tmp_path, CSM_SHUTDOWN_GRACE_S="60", CSM_SESSION_PHRASE_MAX_MS="2000",
                    CSM_SESSION_IDLE_FLUSH_S="0", CSM_MAX_BATCH="4") as running:  # fmt: skip
        yield running


async def _read_ws(ws, events: list) -> int | None:
    """Read until the server closes; returns its close code."""
    try:
        with anyio.fail_after(90):
            while True:
                msg = await ws.recv()
                if isinstance(msg, str):
                    events.append(json.loads(msg))
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd is not None else None


async def test_sigterm_drains_then_exits_zero(server):
    proc, url = server
    ws_url = "ws" + url[4:] + "/v1/ws/stream-text/"
    form = {"voice_id": "alloy", "output_format": "pcm"}
    idle_sid = httpx.post(url + "/v1/streaming-session", data=form).json()["session_id"]
    busy_sid = httpx.post(url + "/v1/streaming-session", data=form).json()["session_id"]
    # A small receive window: the server cannot run ahead of this client, so the stream is
    # really in flight when SIGTERM arrives, and stays so until the test reads it.
    opts = [(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)]
    body = {"input": "Hello there, my good friend.", "voice": "alloy", "response_format": "pcm",
            "max_audio_length_ms": 2400}
    async with connect(ws_url + idle_sid) as idle, connect(ws_url + busy_sid) as busy, \
            httpx.AsyncClient(base_url=url, transport=httpx.AsyncHTTPTransport(socket_options=opts),
                              timeout=60) as c:  # fmt: skip
        await busy.send(json.dumps({"text_chunk": "Hello there, my good friend.", "is_final": True}))
        busy_events: list = []
        async with c.stream("POST", "/v1/audio/speech", json=body) as stream:
            assert stream.status_code == 200
            chunks = stream.aiter_raw()
            audio = await anext(chunks)
            proc.send_signal(signal.SIGTERM)
            idle_code = await _read_ws(idle, [])
            async with httpx.AsyncClient(base_url=url, timeout=30) as probe:
                ready = await probe.get("/ready")
                refused = await probe.post("/v1/audio/speech", json=body)
            async for piece in chunks:  # the in-flight stream runs to its end
                audio += piece
        busy_code = await _read_ws(busy, busy_events)
    assert idle_code == 1001
    assert ready.status_code == 503 and ready.json()["error"]["code"] == "shutting_down"
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert len(audio) > 0 and len(audio) % (2 * 1920) == 0
    assert len(audio) // (2 * 1920) >= 2  # more than the one chunk read before SIGTERM
    done = [e for e in busy_events if e["type"] == "segment.done"]
    assert busy_code == 1001 and len(done) == 1 and done[0]["stop_reason"] in ("eos", "max_length")
    assert proc.wait(timeout=90) == 0

"""WS /v1/ws/stream-text at the ASGI boundary (Starlette's TestClient): events, audio, engine death."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from csm_voice_api.app import build_app
from csm_voice_api.errors import EngineDead

from .test_sessions_support import FRAME, reference, session_fields, wav_samples


@pytest.fixture
def app_client(settings, engine) -> Iterator[TestClient]:
    with TestClient(build_app(settings, engine)) as c:
        yield c


def open_session(c: TestClient, **fields: object) -> str:
    r = c.post("/v1/streaming-session", files={"audio_file": ("ref.wav", reference())}, data=session_fields(**fields))
    assert r.status_code == 200, r.text
    return r.json()["session_id"]


def read_until_done(ws) -> tuple[bytes, list[dict]]:
    audio, events = bytearray(), []
    while True:
        msg = ws.receive()
        if msg.get("bytes") is not None:
            audio += msg["bytes"]
            continue
        events.append(json.loads(msg["text"]))
        if events[-1]["type"] in ("done", "error"):
            return bytes(audio), events


def test_final_text_is_spoken_then_done(app_client):
    sid = open_session(app_client)
    with app_client.websocket_connect(f"/v1/ws/stream-text/{sid}") as ws:
        ws.send_text(json.dumps({"text_chunk": "The first phrase is here. And a second", "is_final": False}))
        ws.send_text(json.dumps({"text_chunk": " one to end.", "is_final": True}))
        audio, events = read_until_done(ws)
    kinds = [e["type"] for e in events]
    assert kinds == ["segment.start", "segment.done", "segment.start", "segment.done", "done"]
    frames = sum(e["frames"] for e in events if e["type"] == "segment.done")
    assert len(wav_samples(audio)) == frames * FRAME > 0


def test_flush_speaks_buffered_text_without_ending_the_turn(app_client):
    sid = open_session(app_client)
    with app_client.websocket_connect(f"/v1/ws/stream-text/{sid}") as ws:
        ws.send_text(json.dumps({"text_chunk": "no punctuation yet"}))
        ws.send_text(json.dumps({"flush": True}))
        ws.send_text(json.dumps({"is_final": True}))
        _, events = read_until_done(ws)
    assert [e["text"] for e in events if e["type"] == "segment.start"] == ["no punctuation yet"]


class _DeadEngine:
    """Stands in for an engine whose loop has died."""

    def generate(self, *args: object, **kwargs: object) -> AsyncIterator:
        raise EngineDead("the engine loop failed (test)")

    def release(self, conversation: object) -> None:
        pass


def test_engine_death_sends_an_error_and_closes_1011(app_client):
    sid = open_session(app_client)
    sessions = app_client.app.state.sessions  # type: ignore[attr-defined]
    real, sessions.engine = sessions.engine, _DeadEngine()
    try:
        with app_client.websocket_connect(f"/v1/ws/stream-text/{sid}") as ws:
            ws.send_text(json.dumps({"text_chunk": "This will never be spoken.", "is_final": True}))
            _, events = read_until_done(ws)
            assert events[-1]["type"] == "error" and events[-1]["code"] == "engine_dead"
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
        assert closed.value.code == 1011
    finally:
        sessions.engine = real

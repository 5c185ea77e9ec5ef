"""WS /v1/ws/stream-text against a live uvicorn on 127.0.0.1, with the `websockets` client."""

from __future__ import annotations

import asyncio
import json
import re

import anyio
import httpx
import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from .conftest import decode
from .test_sessions_support import (
    FRAME,
    Received,
    receive_until,
    reference,
    serve,
    wav_samples,
)

PARAGRAPH = "Hello there, my good friend. This is a streaming test, sent one token at a time. Goodbye for now."
PHRASES = ["Hello there, my good friend.", "This is a streaming test,", "sent one token at a time.", "Goodbye for now."]


@pytest.fixture(scope="module")
def live(engine, tmp_path_factory):
    # No idle flush: what is spoken depends only on the text and the frames sent.
    with serve(engine, tmp_path_factory.mktemp("ws"), session_idle_flush_s=0) as server:
        yield server


def ws_url(live, session_id: str) -> str:
    return f"{live.ws_url}/v1/ws/stream-text/{session_id}"


async def wait_idle(engine, timeout: float = 30) -> None:
    with anyio.fail_after(timeout):
        while engine.stats()["active"] or engine.stats()["queued"]:
            await asyncio.sleep(0.02)


async def test_audio_streams_while_the_text_is_still_arriving(live):
    sid = live.open_session()
    tokens = re.findall(r"\S+\s*", PARAGRAPH)
    got = Received()
    first_audio = asyncio.Event()

    async with connect(ws_url(live, sid)) as ws:

        async def read() -> None:
            while True:
                msg = await ws.recv()
                if isinstance(msg, bytes):
                    got.audio += msg
                    first_audio.set()
                elif json.loads(msg)["type"] == "done":
                    got.events.append(json.loads(msg))
                    return
                else:
                    got.events.append(json.loads(msg))

        reader = asyncio.create_task(read())
        for token in tokens[:-1]:
            await ws.send(json.dumps({"text_chunk": token, "is_final": False}))
            await asyncio.sleep(0.01)
        # The last token is held back until audio has arrived: a server that waited for the
        # whole text would never send any, and this wait would fail.
        await asyncio.wait_for(first_audio.wait(), 120)
        await ws.send(json.dumps({"text_chunk": tokens[-1], "is_final": True}))
        await asyncio.wait_for(reader, 120)

    assert [e["text"] for e in got.of("segment.start")] == PHRASES
    assert [e["segment"] for e in got.of("segment.done")] == [0, 1, 2, 3]
    assert all(e["audio_ms"] == e["frames"] * 80 and e["frames"] > 0 for e in got.of("segment.done"))
    assert got.events[-1] == {"type": "done"}
    # One continuous WAV stream: a single header, and exactly the frames the events reported.
    assert got.audio[:4] == b"RIFF" and got.audio.count(b"RIFF") == 1
    assert len(wav_samples(got.audio)) == got.frames * FRAME


async def test_unknown_session_is_closed_with_4404_before_any_engine_work(live, engine):
    before = engine.stats()
    async with connect(ws_url(live, "sess_doesnotexist")) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 4404
    after = engine.stats()
    assert (after["warm"], after["queued"], after["frames_total"]) == (before["warm"], 0, before["frames_total"])


async def test_bad_frames_get_error_events_and_the_connection_stays_usable(live):
    sid = live.open_session()
    async with connect(ws_url(live, sid)) as ws:
        for bad in ["not json", "[1, 2]", '{"text_chunk": 5}', '{"txt": "hello"}', b"\x00\x01"]:
            await ws.send(bad)
            error = json.loads(await ws.recv())
            assert error["type"] == "error" and error["message"], bad
        await ws.send(json.dumps({"text_chunk": "Still here after all that.", "is_final": True}))
        got = await receive_until(ws, Received())
    assert [e["text"] for e in got.of("segment.start")] == ["Still here after all that."]
    assert len(wav_samples(got.audio)) == got.frames * FRAME > 0


async def test_cancel_stops_audio_and_drops_buffered_text(live, engine):
    cap_frames = 40
    sid = live.open_session(max_audio_length_ms=cap_frames * 80)
    async with connect(ws_url(live, sid)) as ws:
        await ws.send(json.dumps({"text_chunk": "This first phrase gets cut off. And this tail stays buffered"}))
        got = Received()
        while not got.audio:  # speaking has started
            msg = await asyncio.wait_for(ws.recv(), 120)
            if isinstance(msg, bytes):
                got.audio += msg
            else:
                got.events.append(json.loads(msg))
        await ws.send(json.dumps({"cancel": True}))
        await receive_until(ws, got, "cancelled")
        cut = got.of("segment.done")
        assert len(cut) == 1 and cut[0]["stop_reason"] == "cancelled"
        assert 0 < cut[0]["frames"] < cap_frames
        # Nothing of the cancelled phrase follows its segment.done: the stream holds exactly its frames.
        assert len(wav_samples(got.audio)) == cut[0]["frames"] * FRAME
        await wait_idle(engine)

        await ws.send(json.dumps({"text_chunk": "After the cancel.", "is_final": True}))
        await receive_until(ws, got)
    # The buffered tail was dropped, not spoken later.
    assert [e["text"] for e in got.of("segment.start")] == ["This first phrase gets cut off.", "After the cancel."]
    assert [e["segment"] for e in got.of("segment.done")] == [0, 1]
    assert len(wav_samples(got.audio)) == got.frames * FRAME


async def test_disconnect_aborts_generation_and_the_session_lives_on(live, engine):
    cap_frames = 40
    sid = live.open_session(max_audio_length_ms=cap_frames * 80)
    async with connect(ws_url(live, sid)) as ws:
        await ws.send(json.dumps({"text_chunk": "A phrase nobody will hear the end of.", "flush": True}))
        while not isinstance(await asyncio.wait_for(ws.recv(), 120), bytes):
            pass
    await wait_idle(engine)
    state = httpx.get(f"{live.url}/v1/streaming-session/{sid}").json()
    assert 0 < state["audio_ms"] < cap_frames * 80
    assert state["state"] == "warm"
    # A new connection to the same session speaks again.
    async with connect(ws_url(live, sid)) as ws:
        await ws.send(json.dumps({"text_chunk": "Welcome back.", "is_final": True}))
        got = await receive_until(ws, Received())
    assert got.of("segment.start")[0]["segment"] == 1
    assert len(wav_samples(got.audio)) == got.frames * FRAME > 0


async def test_a_second_connection_to_a_busy_session_is_refused(live):
    sid = live.open_session()
    async with connect(ws_url(live, sid)) as first:
        await first.send(json.dumps({"text_chunk": ""}))  # the first connection is attached now
        await asyncio.sleep(0.2)
        async with connect(ws_url(live, sid)) as second:
            with pytest.raises(ConnectionClosed) as closed:
                await second.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4409
        await first.send(json.dumps({"text_chunk": "The first one still works.", "is_final": True}))
        got = await receive_until(first, Received())
    assert got.frames > 0


async def test_deleting_the_session_closes_its_socket(live):
    sid = live.open_session()
    async with connect(ws_url(live, sid)) as ws:
        await ws.send(json.dumps({"text_chunk": ""}))
        await asyncio.sleep(0.2)
        async with httpx.AsyncClient() as c:
            assert (await c.delete(f"{live.url}/v1/streaming-session/{sid}")).status_code == 200
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000


@pytest.mark.parametrize("fmt", ["mp3", "opus", "pcm"])
async def test_other_formats_stream_one_decodable_file_per_turn(live, decode_audio, codec_slack, fmt):
    sid = live.open_session(output_format=fmt)
    async with connect(ws_url(live, sid)) as ws:
        await ws.send(json.dumps({"text_chunk": "One format, one stream. Two phrases in it.", "is_final": True}))
        got = await receive_until(ws, Received())
    assert len(got.of("segment.done")) == 2
    audio = decode_audio(bytes(got.audio), fmt)
    assert abs(audio.samples_24k - got.frames * FRAME) <= codec_slack[fmt]



class Barrier:
    """A cyclic barrier for n tasks (asyncio.Barrier needs Python 3.11)."""

    def __init__(self, n: int):
        self.n, self.count, self.event = n, 0, asyncio.Event()

    async def wait(self) -> None:
        event = self.event
        self.count += 1
        if self.count == self.n:
            self.count, self.event = 0, asyncio.Event()
            event.set()
        else:
            await event.wait()


async def test_two_sessions_with_different_voices_interleave_without_mixing(live):
    texts = {"a": ["Alpha speaks first here.", "Alpha speaks again now."],
             "b": ["Bravo has other words.", "Bravo finishes the talk."]}  # fmt: skip
    voices = {"a": reference(freq=300.0), "b": reference(freq=900.0)}

    async def speak(sid: str, phrases: list[str], barrier: Barrier | None) -> bytes:
        async with connect(ws_url(live, sid)) as ws:
            got = Received()
            for i, phrase in enumerate(phrases):
                if barrier is not None:
                    await barrier.wait()  # both sessions speak phrase i at the same time
                await ws.send(json.dumps({"text_chunk": phrase + " ", "is_final": i == len(phrases) - 1}))
                await receive_until(ws, got, "segment.done")
            await receive_until(ws, got)
        assert [e["text"] for e in got.of("segment.start")] == phrases
        return bytes(got.audio)

    alone = await speak(live.open_session(voices["a"]), texts["a"], None)
    sid_a, sid_b = live.open_session(voices["a"]), live.open_session(voices["b"])
    barrier = Barrier(2)
    a, b = await asyncio.gather(speak(sid_a, texts["a"], barrier), speak(sid_b, texts["b"], barrier))

    sessions = live.app.state.sessions
    for sid, key in ((sid_a, "a"), (sid_b, "b")):
        assert [t.text for t in sessions.get(sid).conversation.turns] == texts[key]
    # Same voice, same seed: the interleaved run changed nothing but float rounding. Watermark
    # pieces of both sessions may share a batch, and a batch's convolutions round a piece's
    # samples differently from a lone piece's (by an LSB or two); mixing would differ everywhere.
    got, want, other = (decode(x, "wav").pcm for x in (a, alone, b))  # s16 sample values
    assert len(got) == len(want) and np.abs(got - want).max() <= 4
    assert np.abs(got[: len(other)] - other[: len(got)]).max() > 50  # far past rounding: the other voice


async def test_a_pause_in_the_text_speaks_what_is_buffered(engine, tmp_path):
    with serve(engine, tmp_path, session_idle_flush_s=0.3) as server:
        sid = server.open_session()
        async with connect(ws_url(server, sid)) as ws:
            # No punctuation and no final: only the pause can make this a phrase.
            await ws.send(json.dumps({"text_chunk": "words without an ending"}))
            got = await receive_until(ws, Received(), "segment.done")
            await ws.send(json.dumps({"is_final": True}))
            await receive_until(ws, got)
    assert [e["text"] for e in got.of("segment.start")] == ["words without an ending"]
    assert len(wav_samples(got.audio)) == got.frames * FRAME > 0

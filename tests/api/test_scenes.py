"""POST /v1/scene on the demo engine: turn lengths, speakers, context clips from data: and http URLs."""

from __future__ import annotations

import base64
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np
import pytest

from csm_voice_api.api.scenes import SceneRequest, render_scene
from csm_voice_api.app import build_app
from csm_voice_api.audio.encode import wav_bytes
from csm_voice_api.engine.types import FRAME_SAMPLES

CLIP = wav_bytes(np.random.default_rng(0).uniform(-0.3, 0.3, 24_000).astype(np.float32))
DATA_URI = "data:audio/wav;base64," + base64.b64encode(CLIP).decode()
SCENE = [{"text": "Hello, who is this?", "speaker_id": 0}, {"text": "It is me.", "speaker_id": 1},
         {"text": "Oh, hi.", "speaker_id": 0}]  # fmt: skip


@asynccontextmanager
async def app_client(settings, engine) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(settings, engine)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test", timeout=120) as c:
            yield c


class _Clips(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/clip.wav":
            self.send_response(200)
            self.send_header("Content-Length", str(len(CLIP)))
            self.end_headers()
            self.wfile.write(CLIP)
        elif self.path == "/to-private":
            self.send_response(302)
            self.send_header("Location", "http://10.0.0.1/clip.wav")  # never contacted: refused first
            self.end_headers()
        else:
            self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def clip_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Clips)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def body(context: list[dict], **extra: object) -> dict:
    return {"scene": SCENE, "context": context, "seed": 5, "max_audio_length_ms": 1600, **extra}


async def test_scene_length_is_the_sum_of_its_turns(settings, engine, decode_audio):
    context = [{"prompt": "I am the first.", "audio_url": DATA_URI, "speaker_id": 0},
               {"prompt": "I am the second.", "audio_url": DATA_URI, "speaker_id": 1}]  # fmt: skip
    async with app_client(settings, engine) as c:
        r = await c.post("/v1/scene", json=body(context))
        assert r.status_code == 200, r.text
        out = r.json()
        audio = out["audio"]
        assert audio["content_type"] == "audio/wav" and audio["url"].endswith("/v1/audio/" + audio["file_name"])
        file = await c.get(audio["url"].removeprefix("http://test"))
    assert file.status_code == 200 and len(file.content) == audio["file_size"]
    frames = [t["frames"] for t in out["turns"]]
    assert [t["speaker_id"] for t in out["turns"]] == [0, 1, 0]
    assert all(n > 0 for n in frames[:1]) and sum(frames) <= 1600 // 80
    assert len(decode_audio(file.content, "wav").pcm) == sum(frames) * FRAME_SAMPLES
    assert out["duration_ms"] == sum(frames) * 80


class SpyEngine:
    """The real engine, recording what each generate call was given."""

    def __init__(self, engine):
        self._engine = engine
        self.calls: list[tuple[int, str, tuple, int]] = []

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def generate(self, conv, text, *, speaker=None, **kw):
        self.calls.append((speaker, text, conv.voice.segments, len(conv.turns)))
        return self._engine.generate(conv, text, speaker=speaker, **kw)


async def test_each_turn_is_the_next_turn_of_one_conversation(settings, engine, tmp_path):
    from csm_voice_api.api.audio_files import OutputStore

    spy = SpyEngine(engine)
    context = [{"prompt": "First.", "audio_url": DATA_URI, "speaker_id": 1},
               {"prompt": "Second.", "speaker_id": 0}]  # fmt: skip
    req = SceneRequest.model_validate({**body(context), "max_audio_length_ms": 60_000})
    result = await render_scene(spy, req, settings, OutputStore(tmp_path, settings.retention()), watermark=None)
    assert [(s, t) for s, t, _, _ in spy.calls] == [(0, SCENE[0]["text"]), (1, SCENE[1]["text"]), (0, SCENE[2]["text"])]
    segments = spy.calls[0][2]
    assert [(s.speaker, s.text, s.codes is None) for s in segments] == [(1, "First.", False), (0, "Second.", True)]
    assert all(c[2] is segments for c in spy.calls)  # one prompt for the whole scene
    assert [c[3] for c in spy.calls] == [0, 1, 2]  # earlier turns stay in the conversation
    assert len(result["turns"]) == 3


async def test_audio_url_from_an_allowed_local_server(settings_factory, engine, clip_server):
    context = [{"prompt": "Hi.", "audio_url": clip_server + "/clip.wav", "speaker_id": 0}]
    async with app_client(settings_factory(fetch_allow_networks=["127.0.0.1"]), engine) as c:
        r = await c.post("/v1/scene", json=body(context))
        assert r.status_code == 200, r.text
        bad = await c.post("/v1/scene", json=body([{**context[0], "audio_url": clip_server + "/to-private"}]))
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "unsafe_url", bad.text
        assert bad.json()["error"]["param"] == "context[0].audio_url"


async def test_private_addresses_are_refused_by_default(client, clip_server):
    for url in (clip_server + "/clip.wav", "http://[::1]/x.wav", "http://169.254.169.254/latest", "file:///etc/passwd"):
        r = await client.post("/v1/scene", json=body([{"prompt": "Hi.", "audio_url": url}]))
        assert r.status_code == 400, (url, r.text)
        assert r.json()["error"]["code"] == "unsafe_url"


@pytest.mark.parametrize(
    ("scene", "status"),
    [([], 422), ([{"text": " ", "speaker_id": 0}], 400), ([{"text": "Hi.", "speaker_id": 12}], 400)],
)
async def test_bad_scenes_are_refused(client, scene, status):
    r = await client.post("/v1/scene", json={"scene": scene})
    assert r.status_code == status, r.text


async def test_undecodable_clip_names_its_field(client):
    bad = "data:audio/wav;base64," + base64.b64encode(b"not audio at all").decode()
    r = await client.post("/v1/scene", json=body([{"prompt": "Hi.", "audio_url": bad}]))
    assert r.status_code == 415 and r.json()["error"]["param"] == "context[0].audio_url"

"""The generated-file store and GET /v1/audio/{filename}: opaque names, retention, no traversal."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from csm_voice_api.api.audio_files import NAME_RE, OutputStore
from csm_voice_api.config import OutputRetention
from csm_voice_api.errors import InvalidInput, NotFound


def test_save_names_are_opaque_and_files_round_trip(tmp_path: Path):
    store = OutputStore(tmp_path / "out", OutputRetention(max_files=10, max_age_s=60))
    a, b = store.save(b"one", "wav"), store.save(b"two", "mp3")
    assert a != b and NAME_RE.fullmatch(a) and NAME_RE.fullmatch(b)
    assert store.path(a).read_bytes() == b"one"
    assert store.path(b) == (tmp_path / "out" / b).resolve()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted([a, b])  # no temp files left
    with pytest.raises(InvalidInput):
        store.save(b"x", "exe")


def test_retention_by_count_then_age(tmp_path: Path):
    store = OutputStore(tmp_path, OutputRetention(max_files=3, max_age_s=100))
    t0 = time.time() - 50
    names = []
    for i in range(5):
        names.append(store.save(bytes([i]), "pcm"))
        os.utime(tmp_path / names[-1], (t0 + i, t0 + i))  # distinct, ordered ages
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
    store.prune(now=t0 + 4 + 50)
    assert len(list(tmp_path.iterdir())) == 3
    store.prune(now=t0 + 3 + 101)  # names[2] and names[3] are now older than 100 s
    assert [p.name for p in tmp_path.iterdir()] == [names[4]]
    with pytest.raises(NotFound):
        store.path(names[0])


@pytest.mark.parametrize("name", ["../secret.wav", "..", "a" * 32 + ".wav/..", "A" * 32 + ".wav", "x.wav", ""])
def test_path_refuses_anything_but_stored_names(tmp_path: Path, name: str):
    store = OutputStore(tmp_path / "out", OutputRetention(max_files=3, max_age_s=100))
    with pytest.raises((InvalidInput, NotFound)):
        store.path(name)


async def test_get_serves_a_saved_file(client):
    store = client._transport.app.state.outputs  # type: ignore[attr-defined]
    name = store.save(b"RIFF-not-really", "wav")
    r = await client.get(f"/v1/audio/{name}")
    assert r.status_code == 200
    assert r.content == b"RIFF-not-really"
    assert r.headers["content-type"] == "audio/wav"
    missing = await client.get(f"/v1/audio/{'0' * 32}.wav")
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "filename"


@pytest.mark.parametrize(
    "path",
    [
        "/v1/audio/..%2F..%2Fetc%2Fpasswd",
        "/v1/audio/%2e%2e%2fconfig.py",
        "/v1/audio/../../pyproject.toml",
        "/v1/audio/..%5C..%5Cwin.ini",
        "/v1/audio/" + "0" * 32 + ".wav%00.txt",
        "/v1/audio/" + "0" * 31 + "g.wav",
        "/v1/audio/outputs",
    ],
)
async def test_traversal_attempts_never_read_files(client, path, tmp_path):
    (tmp_path / "secret.wav").write_bytes(b"secret")
    r = await client.get(path)
    assert r.status_code in (400, 404), r.text
    assert "error" in r.json()
    assert b"secret" not in r.content and b"[project]" not in r.content


def test_store_ignores_foreign_files_when_pruning(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("mine")
    store = OutputStore(tmp_path, OutputRetention(max_files=1, max_age_s=1e9))
    store.save(b"a", "wav")
    time.sleep(0.01)
    store.save(b"b", "wav")
    assert (tmp_path / "keep.txt").read_text() == "mine"
    assert len([p for p in tmp_path.iterdir() if NAME_RE.fullmatch(p.name)]) == 1

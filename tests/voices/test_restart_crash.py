"""A server SIGKILLed while clones are in flight leaves no half voice: after a restart every voice
it acknowledged is there with its audio and codes, and no orphan row or file remains."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from csm_voice_api.voices import VoiceStore

from .test_restart import clip

ROOT = Path(__file__).resolve().parents[2]


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "CSM_DATA_DIR": str(data_dir), "PYTHONPATH": str(ROOT), "CSM_WARMUP": "false"}
    cmd = [sys.executable, "-m", "csm_voice_api", "serve", "--model", "demo", "--device", "cpu",
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=data_dir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "server did not come up"
        try:
            httpx.get(url + "/health", timeout=5)
            return proc, url
        except httpx.TransportError:
            time.sleep(0.2)


def clone_until_refused(url: str, acked: list[str], stop: threading.Event) -> None:
    n = 0
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            n += 1
            files = {"audio_file": ("ref.wav", clip(0.3 + 0.1 * (n % 5)), "audio/wav")}
            try:
                r = c.post("/v1/voice-cloning/clone", data={"name": f"v{threading.get_ident()}-{n}",
                                                            "transcript": "Words."}, files=files)  # fmt: skip
            except httpx.TransportError:
                return  # the server is gone
            if r.status_code == 200:
                acked.append(r.json()["id"])


@pytest.mark.slow
def test_sigkill_during_clones_leaves_a_consistent_library(tmp_path: Path):
    rng = random.Random(11)
    acked: list[str] = []
    proc, url = start_server(tmp_path)
    stop = threading.Event()
    try:
        clients = [threading.Thread(target=clone_until_refused, args=(url, acked, stop)) for _ in range(3)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 60
        while len(acked) < 3:  # some clones done, others in flight
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.2))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
        stop.set()
    for t in clients:
        t.join(30)
    assert proc.returncode == -signal.SIGKILL

    with VoiceStore(tmp_path / "voices") as store:  # what the restarted server opens
        report = store.last_recovery
        assert report.dropped_rows == [] and report.cleared_codes == []
        voices = store.list()
        assert set(acked) <= {v.id for v in voices}  # every acknowledged clone survived
        for v in voices:
            assert v.has_codes and store.load_codes(v).shape[1] >= 1
            assert store.load_audio(v).size > 0
        referenced = {n for v in voices for n in (v.audio_file, v.codes_file) if n}
        assert {p.name for p in store.files_dir.iterdir()} == referenced  # no orphans, no temp files

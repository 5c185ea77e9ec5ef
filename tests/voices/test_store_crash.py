from __future__ import annotations

import hashlib
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from csm_voice_api.voices import VoiceStore

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("crash_worker.py")
ROUNDS = 5


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def rows(db: Path) -> list[tuple[str, str, str | None]]:
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        return con.execute("SELECT id, audio_sha256, codes_sha256 FROM voices").fetchall()
    finally:
        con.close()


def kill_mid_work(data_dir: Path, seed: int, rng: random.Random) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, str(WORKER), str(data_dir), str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
    )
    try:
        line = proc.stdout.readline()  # the store is open and the threads are writing
        assert line == b"ready\n", proc.stderr.read().decode()
        time.sleep(rng.uniform(0.01, 0.3))
        assert proc.poll() is None, proc.stderr.read().decode()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_during_writes_leaves_a_consistent_store(tmp_path: Path) -> None:
    rng = random.Random(7)
    files = tmp_path / "files"
    for seed in range(ROUNDS):
        kill_mid_work(tmp_path, seed, rng)
        # Before any repair: the write ordering alone guarantees every row's files are intact.
        for voice_id, audio_sha, codes_sha in rows(tmp_path / "voices.db"):
            assert sha(files / f"{voice_id}.wav") == audio_sha
            if codes_sha is not None:
                assert sha(files / f"{voice_id}.codes-{codes_sha[:16]}.npy") == codes_sha
        with VoiceStore(tmp_path) as store:
            report = store.last_recovery
            assert report.dropped_rows == [] and report.cleared_codes == []
            voices = store.list()
            for v in voices:
                assert store.load_audio(v).shape == (2400,)
                assert v.codes_file is None or store.load_codes(v).shape[0] == 8
        referenced = {n for v in voices for n in (v.audio_file, v.codes_file) if n}
        assert {p.name for p in files.iterdir()} == referenced  # no orphans, no temp files
        assert len(rows(tmp_path / "voices.db")) == len(voices)
    assert voices, "the workers committed voices before being killed"

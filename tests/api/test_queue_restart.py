"""The queue survives a SIGKILL of the real CLI server: queued and running jobs complete after restart."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from ..live import cli_server

LONG_SCENE = {"scene": [{"text": f"This is line number {i} of the scene.", "speaker_id": i % 2} for i in range(8)],
              "seed": 4, "max_audio_length_ms": 12_000}  # fmt: skip
SPEECH = {"input": "Hello there.", "voice": "alloy", "response_format": "wav", "seed": 1, "max_audio_length_ms": 400}


@contextmanager
def server(data_dir: Path, **env: str) -> Iterator[tuple[subprocess.Popen, str]]:
    with cli_server(data_dir, CSM_MAX_BATCH="2", **env) as running:
        yield running


def poll(url: str, until: tuple[str, ...], tries: int = 3000) -> dict:
    for _ in range(tries):
        s = httpx.get(url, timeout=30).json()
        if s["status"] in until:
            return s
        time.sleep(0.02)
    raise AssertionError(f"never reached {until}: {s}")


def test_jobs_survive_sigkill_mid_queue(tmp_path: Path):
    with server(tmp_path) as (proc, url):
        long = httpx.post(url + "/v1/queue/scene", json=LONG_SCENE, timeout=30).json()
        short = httpx.post(url + "/v1/queue/speech", json=SPEECH, timeout=30).json()
        poll(long["status_url"], ("IN_PROGRESS",))
        behind = httpx.get(short["status_url"], timeout=30).json()
        assert behind["status"] == "IN_QUEUE" and behind["queue_position"] == 0
        proc.send_signal(signal.SIGKILL)  # no shutdown code runs
        proc.wait(30)

    with server(tmp_path) as (_, url2):
        # The ids (and the URLs, on the new port) still answer; both jobs run to the end.
        for job, route in ((long, "scene"), (short, "speech")):
            status_url = f"{url2}/v1/queue/{route}/requests/{job['request_id']}/status"
            assert poll(status_url, ("COMPLETED", "FAILED", "CANCELED"))["status"] == "COMPLETED"
            result = httpx.get(f"{url2}/v1/queue/{route}/requests/{job['request_id']}", timeout=30).json()
            audio = httpx.get(result["audio"]["url"].replace(url, url2), timeout=30)
            assert audio.status_code == 200 and len(audio.content) == result["audio"]["file_size"] > 44


def test_queued_jobs_wait_for_a_worker_across_restart(tmp_path: Path):
    with server(tmp_path, CSM_QUEUE_WORKERS="0") as (proc, url):
        ids = [httpx.post(url + "/v1/queue/speech", json=SPEECH, timeout=30).json()["request_id"] for _ in range(2)]
        assert httpx.get(f"{url}/v1/queue/speech/requests/{ids[1]}/status").json()["queue_position"] == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    with server(tmp_path) as (_, url2):
        for i in ids:
            assert poll(f"{url2}/v1/queue/speech/requests/{i}/status", ("COMPLETED", "FAILED"))["status"] == "COMPLETED"

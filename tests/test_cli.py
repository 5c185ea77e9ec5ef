"""The `csm-voice-api` console script: say, the demo banner, serve's settings, verify-watermark."""

from __future__ import annotations

import asyncio
import re
import sys
import wave
from pathlib import Path

import httpx
import numpy as np
import pytest

from csm_voice_api import cli
from csm_voice_api.config import Settings

from .live import cli_server

ROOT = Path(__file__).resolve().parent.parent


def test_say_writes_a_wav_of_whole_frames(tmp_path: Path, capsys):
    out = tmp_path / "out.wav"
    rc = cli.main(["say", "Hello there.", "-o", str(out), "--model", "demo", "--device", "cpu",
                   "--max-ms", "800", "--seed", "5", "--voice", "echo"])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    frames = int(re.search(r"wrote .*: (\d+) frames", err).group(1))
    assert "RANDOM NOISE" in err  # the demo banner
    assert "frame" in err  # the progress bar
    with wave.open(str(out)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (24_000, 1, 2)
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    assert 1 <= frames <= 10
    assert len(pcm) == frames * 1920
    assert np.any(pcm != 0)


def test_say_output_is_watermarked_unless_turned_off(tmp_path: Path, monkeypatch):
    def say(name: str) -> np.ndarray:
        out = tmp_path / name
        assert cli.main(["say", "Hello there.", "-o", str(out), "--model", "demo", "--device", "cpu",
                         "--max-ms", "800", "--seed", "5", "--voice", "echo"]) == 0  # fmt: skip
        with wave.open(str(out)) as w:
            return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)

    marked = say("marked.wav")
    monkeypatch.setenv("CSM_WATERMARK", "false")
    plain = say("plain.wav")
    assert marked.shape == plain.shape and plain.size > 0
    diff = np.sqrt(np.mean((marked - plain) ** 2)) / np.sqrt(np.mean(plain**2))
    assert 1e-4 < diff < 0.1  # the watermark's quiet message, not another signal


def test_say_refuses_an_unknown_voice(tmp_path: Path):
    with pytest.raises(SystemExit, match="unknown voice"):
        cli.main(["say", "Hi.", "-o", str(tmp_path / "x.wav"), "--model", "demo", "--device", "cpu",
                  "--voice", "nobody"])  # fmt: skip
    assert not (tmp_path / "x.wav").exists()


class _Demo:
    is_demo = True
    demo_reason = "sesame/csm-1b is gated and no HF_TOKEN is set"


def test_demo_banner_is_loud_and_says_what_to_do():
    banner = cli.demo_banner(_Demo())  # type: ignore[arg-type]
    lines = banner.splitlines()
    assert len(lines) >= 10
    assert len({len(line) for line in lines}) == 1  # a closed box
    text = " ".join(lines)
    for needle in ("RANDOM NOISE", "HF_TOKEN", "huggingface.co/sesame/csm-1b", "--model /path", "no HF_TOKEN is set"):
        assert needle in text
    # Wrapped by paragraph: a line ends early only where its paragraph (or list item) does.
    inner = [line[2:-2].rstrip() for line in lines[1:-1]]
    for a, b in zip(inner, inner[1:]):
        if a and b and not re.match(r"\s*\d+\.", b):
            assert len(a) + 1 + len(b.split()[0]) > cli._WIDTH - 4, (a, b)


def test_serve_flags_override_environment(monkeypatch):
    monkeypatch.setenv("CSM_PORT", "9001")
    monkeypatch.setenv("CSM_MODEL", "sesame/csm-1b")
    monkeypatch.setenv("CSM_API_KEYS", "a, b,,c")
    args = cli._parser().parse_args(["serve", "--model", "demo", "--host", "0.0.0.0"])
    s = cli._settings(args)
    assert (s.model, s.host, s.port) == ("demo", "0.0.0.0", 9001)
    assert s.api_keys == ["a", "b", "c"]
    assert s.engine_config().model == "demo"
    assert s.limits().max_text_chars == 4096
    assert (s.sampling().temperature, s.sampling().topk) == (0.9, 50)


def test_settings_read_dotenv(tmp_path: Path, monkeypatch):
    (tmp_path / ".env").write_text("CSM_PORT=7007\nCSM_MAX_TEXT_CHARS=100\n")
    monkeypatch.chdir(tmp_path)
    s = Settings()
    assert (s.port, s.max_text_chars) == (7007, 100)


def test_verify_watermark_missing_file(tmp_path: Path, capsys):
    assert cli.main(["verify-watermark", str(tmp_path / "nope.wav")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_serve_runs_the_server_and_prints_the_banner(tmp_path: Path):
    # The defaults a user gets: watermark and start-up warm-up on.
    with cli_server(tmp_path, log_level="info", CSM_WATERMARK="true", CSM_WARMUP="true") as (proc, url):
        assert httpx.get(f"{url}/health", timeout=5).json()["is_demo"] is True
        assert asyncio.run(_ws_extensions(url)) is None  # no per-message deflate: audio does not compress
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert "RANDOM NOISE" in err and "HF_TOKEN" in err
    assert "csm_voice_api.app: engine ready" in err  # our INFO logs reach the terminal beside uvicorn's


async def _ws_extensions(url: str) -> str | None:
    """The extensions a streaming WebSocket of `serve` agrees to, for a client that offers deflate."""
    from websockets.asyncio.client import connect

    sid = httpx.post(f"{url}/v1/streaming-session", data={"voice_id": "alloy"}, timeout=10).json()["session_id"]
    async with connect(f"ws{url[4:]}/v1/ws/stream-text/{sid}", compression="deflate") as ws:
        assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]  # it was offered
        return ws.response.headers.get("Sec-WebSocket-Extensions")


def test_serve_tunes_its_process_for_the_engine_thread(monkeypatch):
    import gc

    calls: list[float] = []
    monkeypatch.setattr(sys, "setswitchinterval", calls.append)
    cli._tune_process(Settings(_env_file=None, gil_switch_ms=0.5))
    assert calls == [0.0005]
    monkeypatch.setattr(cli, "_announce", lambda engine: None)
    try:
        cli._on_engine(_Demo())  # type: ignore[arg-type]
        assert gc.get_freeze_count() > 0  # the start-up heap is out of the collector's walks
    finally:
        gc.unfreeze()

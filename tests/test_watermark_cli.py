"""`csm-voice-api verify-watermark FILE`: the real loader and silentcipher decode, JSON out.

Random networks decode some message, never the key: the answers are compared with the module's
own verify of the same file, and the exit code says "not the key" (1).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from csm_voice_api import cli
from csm_voice_api.audio.watermark import (
    CPU_PHASE_SEARCH_S,
    CPU_PHASE_STEP,
    Watermarker,
    demo_watermarker,
    verify_file,
)

from .audio.test_watermark import voice_like, write_checkpoint

SR = 24_000


def run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    code = cli.main(["verify-watermark", *argv])
    out = capsys.readouterr()
    return code, (json.loads(out.out) if out.out.strip() else None), out.err


def as_json(res, key: str = "public") -> dict:
    return {"watermarked": res.watermarked, "key_matches": res.key_matches, "confidence": res.confidence,
            "key": key, "message": None if res.message is None else list(res.message)}  # fmt: skip


@pytest.fixture(autouse=True)
def _no_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A developer's .env or environment must not change which key or weights are used.
    monkeypatch.chdir(tmp_path)
    for k in ("CSM_WATERMARK_KEY", "CSM_WATERMARK_WEIGHTS"):
        monkeypatch.delenv(k, raising=False)


def test_demo_networks_with_the_bounded_cpu_search(tmp_path: Path, capsys) -> None:
    wm = demo_watermarker()
    path = tmp_path / "marked.wav"
    sf.write(path, wm.apply(voice_like(1.3, seed=1)), SR, subtype="PCM_16")
    code, report, _ = run(capsys, str(path), "--demo", "--device", "cpu")
    want = verify_file(path, wm, phase_search_s=CPU_PHASE_SEARCH_S, phase_step=CPU_PHASE_STEP)
    assert report == as_json(want)
    assert code == 1 and report["key_matches"] is False  # random networks: not the key


def test_real_loader_from_a_weights_folder_and_a_private_key(tmp_path: Path, capsys) -> None:
    ref = Watermarker.random(seed=3, key=(1, 2, 3, 4, 5))  # full size: checkpoint shapes must match
    write_checkpoint(ref.model, tmp_path / "w")
    path = tmp_path / "marked.flac"
    sf.write(path, ref.apply(voice_like(1.1, seed=2)), SR)
    # The full-size decoder's phase search takes minutes on CPU: offset 0 (one decode) here.
    code, report, _ = run(capsys, str(path), "--weights", str(tmp_path / "w"), "--key", "1,2,3,4,5",
                          "--device", "cpu", "--phase-search-s", "0")  # fmt: skip
    pcm, sr = sf.read(path, dtype="float32")
    assert report == as_json(ref.verify(pcm, sr, phase_search_s=0), key="private")
    assert code == (0 if report["key_matches"] else 1)


def test_errors_exit_2_and_say_why(tmp_path: Path, capsys) -> None:
    code, report, err = run(capsys, str(tmp_path / "nope.wav"), "--demo")
    assert (code, report) == (2, None) and "no such file" in err
    good = tmp_path / "a.wav"
    sf.write(good, np.zeros(100, np.float32), SR)
    code, report, err = run(capsys, str(good), "--demo", "--key", "1,2,3")
    assert (code, report) == (2, None) and "CSM_WATERMARK_KEY" in err
    code, report, err = run(capsys, str(good), "--weights", str(tmp_path))
    assert (code, report) == (2, None) and "hparams.yaml" in err
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"not audio at all" * 40)
    code, report, err = run(capsys, str(junk), "--demo")
    assert (code, report) == (2, None) and "decode" in err

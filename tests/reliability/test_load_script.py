"""bench/load.py runs against a live server and reports what it saw (tiny load, bounded)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

LOAD = Path(__file__).resolve().parents[2] / "bench" / "load.py"


def load_module():
    spec = importlib.util.spec_from_file_location("bench_load", LOAD)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_load"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


async def test_load_script_reports_sessions_and_streams(live_factory):
    load = load_module()
    live = live_factory()
    args = load.parse(["--url", live.url, "--ws", "1", "--speech", "2", "--duration", "1.5", "--audio-ms", "400",
                       "--ttfa-slo", "60", "--stall-slo", "60"])
    report = await load.main(args)
    level = report["levels"][0]
    assert level["ws_sessions"]["ok"] >= 1 and level["speech_streams"]["ok"] >= 1
    assert level["all"]["errors"] == {}
    assert level["speech_streams"]["ok"] + level["speech_streams"]["rejected"] == level["speech_streams"]["utterances"]
    assert level["ws_sessions"]["ttfa_p99_ms"] > 0 and level["ws_sessions"]["audio_s"] > 0
    assert report["held_clients"] == 3

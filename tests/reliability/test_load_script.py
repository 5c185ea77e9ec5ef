"""bench/load.py runs against a live server and reports what it saw (tiny load, bounded)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def load_module(name: str = "load"):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"bench_{name}"] = module  # dataclasses look their module up while the class is built
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
    assert 0 <= level["client_lag_p99_ms"] < 60_000  # the client's own loop lag, beside its stalls
    # Server-side stage timings of the level, from /metrics (watermark off in these servers).
    stages = level["stages"]
    for name in ("engine_first_chunk", "engine_chunk_gap", "encode", "send_http", "send_ws"):
        assert stages[name]["count"] > 0 and stages[name]["mean_ms"] > 0, name
        assert 0 < stages[name]["p50_ms"] <= stages[name]["p99_ms"] <= 10_000, name
    assert stages["watermark_compute"] == {"count": 0, "total_s": 0.0, "mean_ms": None, "p50_ms": None,
                                           "p99_ms": None}
    server = level["server"]
    assert server["frames"] > 0 and server["realtime_streams"] > 0
    # The engine thread's time over the level (csm_engine_* counters): parts of a step add up.
    assert server["steps_per_s"] > 0 and server["ms_per_step"] > 0
    parts = (server["wait_ms_per_step"] + server["codec_ms_per_step"] + server["prefill_ms_per_step"]
             + server["other_ms_per_step"])
    assert abs(parts - server["ms_per_step"]) < 0.05 and server["other_ms_per_step"] >= 0
    assert server["prefills"] > 0 and server["prefill_rows_each"] > 1  # sessions and speech prefill text
    assert "engine_chunk_gap" in load.stage_table(report["levels"])
    # bench/load_ab.py prints such reports side by side, a row per level and server.
    ab = load_module("load_ab")
    table = ab.side_by_side([{**report, "server": "a"}, {**report, "server": "b"}]).splitlines()
    assert len(table) == 3 and table[1].split()[:3] == ["3", "a", str(level["all"]["ok"])]
    assert table[0].split()[-3:] == ["client", "lag", "held"] and len(table[1].split()) == len(table[0].split()) - 7


def test_load_ab_server_specs(tmp_path):
    import argparse

    import pytest

    ab = load_module("load_ab")
    s = ab.parse_server(f"old={tmp_path}:CSM_GIL_SWITCH_MS=5,CSM_COMPILE=0")
    assert (s.name, s.root, s.env) == ("old", tmp_path.resolve(), {"CSM_GIL_SWITCH_MS": "5", "CSM_COMPILE": "0"})
    assert ab.parse_server("new=.").env == {}
    for bad in ("new", "=.", "new=", "new=.:CSM_X"):
        with pytest.raises(argparse.ArgumentTypeError):
            ab.parse_server(bad)


def test_stage_deltas_from_two_scrapes():
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from csm_voice_api.api.metrics import STAGE_BUCKETS

    load = load_module()
    reg = CollectorRegistry()
    hist = Histogram("csm_stage_seconds", "test", ["stage"], buckets=STAGE_BUCKETS, registry=reg)
    hist.labels(stage="encode").observe(5.0)  # before the level: not part of its deltas
    before = load.parse_metrics(generate_latest(reg).decode())
    for v in [0.004] * 98 + [0.04, 30.0]:
        hist.labels(stage="encode").observe(v)
    got = load.stage_deltas(before, load.parse_metrics(generate_latest(reg).decode()))["encode"]
    assert got["count"] == 100 and got["total_s"] == round(98 * 0.004 + 30.04, 3)
    assert got["mean_ms"] == round((98 * 0.004 + 30.04) * 10, 1)
    assert 2.5 < got["p50_ms"] <= 5.0  # inside the 2.5-5 ms bucket, interpolated
    assert got["p99_ms"] == 50.0  # the 99th of 100 is 0.04 s: the top of the 30-50 ms bucket
    cum = [(0.01, 1.0), (10.0, 1.0), (float("inf"), 2.0)]
    assert load.bucket_quantile(0.99, cum) == 10.0  # in the +Inf bucket: the largest finite bound
    assert load.bucket_quantile(0.5, []) is None
    # The server's own count of the gaps listeners heard (csm_stream_stall_seconds) is a row too.
    stalls = Histogram("csm_stream_stall_seconds", "test", buckets=(0.1, 0.5, 1.0), registry=reg)
    before = load.parse_metrics(generate_latest(reg).decode())
    stalls.observe(0.3)
    got = load.stage_deltas(before, load.parse_metrics(generate_latest(reg).decode()))["stream_stall"]
    assert got["count"] == 1 and got["mean_ms"] == 300.0

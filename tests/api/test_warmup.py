"""Start-up warm-up: /ready waits for it; it leaves no slot, request or session behind."""

from __future__ import annotations

import asyncio
import logging

import anyio
import httpx

from csm_voice_api.api import metrics, warmup
from csm_voice_api.api.playout import RECENT
from csm_voice_api.app import build_app

from .test_metrics import stage_counts


def warmup_ttfa_count() -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith('csm_time_to_first_audio_seconds_count{route="warmup"}'):
            return float(line.split()[-1])
    return 0.0


async def wait_ready(c: httpx.AsyncClient) -> None:
    with anyio.fail_after(120):
        while (await c.get("/ready")).status_code != 200:
            await asyncio.sleep(0.05)


async def test_ready_waits_for_the_warmup_which_leaves_nothing_behind(settings_factory, engine, monkeypatch):
    gate = asyncio.Event()
    real = warmup.warm_up

    async def gated(app) -> None:  # noqa: ANN001
        await gate.wait()
        RECENT.record(1.0)  # as a cold first utterance's gap would be
        await real(app)

    monkeypatch.setattr(warmup, "warm_up", gated)
    app = build_app(settings_factory(warmup=True, watermark_workers=2), engine)
    stages, ttfa = stage_counts(metrics.render().decode()), warmup_ttfa_count()
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120) as c:
            r = await c.get("/ready")
            assert r.status_code == 503 and r.json()["error"]["code"] == "warming_up"
            assert (await c.get("/health")).status_code == 200  # alive meanwhile
            gate.set()
            await wait_ready(c)
            state = app.state.warmup
            assert state.done and state.error is None and state.seconds > 0
            # The job's release of its slot is a command to the engine thread, sent as the job
            # ends; commands run in order, so once a ping has come back the release has run.
            await engine.ping()
            stats = engine.stats()
            assert (stats["active"], stats["queued"], stats["free_slots"]) == (0, 0, stats["slots"])
            assert app.state.admission.inflight == 0 and len(app.state.sessions) == 0
            assert RECENT.worst() == 0  # its gaps hold no request back (CSM_REALTIME_STALL_MS)
    assert warmup_ttfa_count() == ttfa + 1  # one utterance, under its own route label
    after = stage_counts(metrics.render().decode())
    # One piece alone, then the utterance's own pieces, encoded as mp3.
    assert after["watermark_compute"] >= stages["watermark_compute"] + 2
    assert after["encode"] > stages["encode"] and after["engine_first_chunk"] > stages["engine_first_chunk"]


async def test_a_failed_warmup_is_logged_and_the_server_serves(settings_factory, engine, monkeypatch, caplog):
    async def broken(app) -> None:  # noqa: ANN001
        raise RuntimeError("no codec today")

    monkeypatch.setattr(warmup, "warm_up", broken)
    app = build_app(settings_factory(warmup=True, watermark=False), engine)
    with caplog.at_level(logging.WARNING, logger="csm_voice_api.api.warmup"):
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                await wait_ready(c)
    assert app.state.warmup.error == "RuntimeError: no codec today"
    assert "warm-up failed" in caplog.text


async def test_off_means_ready_at_once(client):
    assert (await client.get("/ready")).status_code == 200  # the test settings turn it off

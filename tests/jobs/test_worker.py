"""JobWorker with stand-in handlers: results, mapped failures, cancel of a running job, overload requeue."""

from __future__ import annotations

import asyncio
from pathlib import Path

from csm_voice_api.errors import EngineDead, Overloaded, VoiceNotFound
from csm_voice_api.jobs.store import JobStatus, JobStore
from csm_voice_api.jobs.worker import JobWorker


async def settle(store: JobStore, job_id: str, status: JobStatus) -> None:
    for _ in range(500):
        if store.get(job_id).status is status:  # type: ignore[union-attr]
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{job_id} never reached {status}: {store.get(job_id)}")


async def test_results_and_failures_are_recorded(tmp_path: Path):
    store = JobStore(tmp_path / "j.db")

    async def handler(job, progress):
        progress(0.5, "half")
        kind = job.payload["kind"]
        if kind == "voice":
            raise VoiceNotFound("No voice 'x'.", param="voice")
        if kind == "dead":
            raise EngineDead("boom")
        if kind == "bug":
            raise RuntimeError("secret detail")
        return {"ok": True}

    worker = JobWorker(store, {"speech": handler})
    jobs = {k: store.submit("speech", {"kind": k}) for k in ("ok", "voice", "dead", "bug")}
    other = store.submit("nope", {})
    await worker.start()
    try:
        for k, job in jobs.items():
            await settle(store, job.id, JobStatus.COMPLETED if k == "ok" else JobStatus.FAILED)
        await settle(store, other.id, JobStatus.FAILED)
    finally:
        await worker.stop()
    ok = store.get(jobs["ok"].id)
    assert ok.result == {"ok": True} and ok.logs[0]["message"] == "half"  # type: ignore[union-attr]
    errors = {k: store.get(j.id).error for k, j in jobs.items() if k != "ok"}  # type: ignore[union-attr]
    assert errors["voice"]["status"] == 404 and errors["voice"]["body"]["error"]["param"] == "voice"
    assert errors["dead"]["status"] == 503 and errors["dead"]["body"]["error"]["code"] == "engine_dead"
    assert errors["bug"]["status"] == 500 and "secret" not in str(errors["bug"])


async def test_cancel_stops_a_running_handler(tmp_path: Path):
    store = JobStore(tmp_path / "j.db")
    started, stopped = asyncio.Event(), asyncio.Event()

    async def handler(job, progress):
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    worker = JobWorker(store, {"scene": handler})
    await worker.start()
    try:
        job = store.submit("scene", {})
        worker.wake()
        await asyncio.wait_for(started.wait(), 30)
        assert store.get(job.id).status is JobStatus.IN_PROGRESS  # type: ignore[union-attr]
        assert worker.cancel(job.id)
        await asyncio.wait_for(stopped.wait(), 30)
        assert store.get(job.id).status is JobStatus.CANCELED  # type: ignore[union-attr]
        assert not worker.cancel(job.id)
        # The worker goes on with the next job.
        nxt = store.submit("scene", {})
        started.clear()
        worker.wake()
        await asyncio.wait_for(started.wait(), 30)
        assert store.get(nxt.id).status is JobStatus.IN_PROGRESS  # type: ignore[union-attr]
    finally:
        await worker.stop()
    assert store.get(nxt.id).status is JobStatus.IN_PROGRESS  # type: ignore[union-attr]  # a restart runs it again


async def test_overloaded_engine_requeues_the_job(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("csm_voice_api.jobs.worker.OVERLOADED_RETRY_S", 0.0)
    store = JobStore(tmp_path / "j.db")
    tries = []

    async def handler(job, progress):
        tries.append(job.attempts)
        if len(tries) < 3:
            raise Overloaded("no slot")
        return {"done": len(tries)}

    worker = JobWorker(store, {"speech": handler})
    job = store.submit("speech", {})
    await worker.start()
    try:
        await settle(store, job.id, JobStatus.COMPLETED)
    finally:
        await worker.stop()
    assert tries == [1, 2, 3] and store.get(job.id).result == {"done": 3}  # type: ignore[union-attr]

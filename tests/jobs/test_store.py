"""JobStore: order, positions, outcomes, and what a reopened store does with interrupted jobs."""

from __future__ import annotations

from pathlib import Path

from csm_voice_api.jobs.store import JobStatus, JobStore


def test_jobs_run_in_order_and_positions_count_down(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.db")
    a, b, c = (store.submit("speech", {"n": i}) for i in range(3))
    assert [store.queue_position(j.id) for j in (a, b, c)] == [0, 1, 2]
    first = store.claim_next()
    assert first is not None and first.id == a.id and first.status is JobStatus.IN_PROGRESS
    assert store.queue_position(a.id) is None and store.queue_position(c.id) == 1
    assert store.finish(a.id, JobStatus.COMPLETED, result={"ok": 1})
    assert not store.finish(a.id, JobStatus.FAILED)  # a finished job keeps its outcome
    got = store.get(a.id)
    assert got is not None and got.result == {"ok": 1} and got.progress == 1.0
    assert store.finish(b.id, JobStatus.CANCELED)  # canceled while queued: never starts
    nxt = store.claim_next()
    assert nxt is not None and nxt.id == c.id and nxt.payload == {"n": 2}
    assert store.claim_next() is None


def test_reopening_requeues_interrupted_jobs_and_keeps_results(tmp_path: Path):
    store = JobStore(tmp_path / "jobs.db")
    done, running, queued = (store.submit("scene", {"n": i}, webhook_url="https://example.com/h") for i in range(3))
    store.claim_next()
    store.finish(done.id, JobStatus.COMPLETED, result={"audio": "x"})
    assert store.claim_next().id == running.id  # type: ignore[union-attr]
    store.progress(running.id, 0.5, "halfway")
    store.close()  # the process dies here

    store = JobStore(tmp_path / "jobs.db")
    assert store.get(done.id).result == {"audio": "x"}  # type: ignore[union-attr]
    assert [j.id for j in store.undelivered()] == [done.id]
    again = store.claim_next()
    assert again is not None and again.id == running.id and again.attempts == 2
    assert store.get(running.id).logs[-1]["message"] == "halfway"  # type: ignore[union-attr]
    assert store.claim_next().id == queued.id  # type: ignore[union-attr]

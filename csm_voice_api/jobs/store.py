"""JobStore: queued jobs and their results in one SQLite file (WAL), so a restart loses none.

A job is accepted only once its row is committed; opening the store puts jobs that were running
when the process died back in the queue (they run again from the start). Every call is short and
serialised by one lock; callers on an event loop may call it directly.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any


class JobStatus(str, Enum):
    IN_QUEUE = "IN_QUEUE"
    IN_PROGRESS = "IN_PROGRESS"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELED = "CANCELED"

    @property
    def is_finished(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELED)


@dataclass
class Job:
    id: str
    route: str
    payload: dict[str, Any]
    status: JobStatus
    created_at: float
    webhook_url: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    progress: float = 0.0
    logs: list[dict[str, Any]] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None  # {"status": int, "body": OpenAI error body}
    attempts: int = 0  # times it started (a restart mid-run makes it 2)
    webhook_state: str | None = None  # None (no hook), "pending", "delivered", "failed"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    route TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    progress REAL NOT NULL DEFAULT 0,
    logs TEXT NOT NULL DEFAULT '[]',
    result TEXT,
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    webhook_url TEXT,
    webhook_state TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs(status, seq);
"""
MAX_LOGS = 50  # per job: progress lines beyond this drop the oldest


class JobStore:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")  # an acknowledged job survives power loss
            self._db.executescript(_SCHEMA)
            # Whatever was running when the last process died runs again.
            self._db.execute("UPDATE jobs SET status=?, progress=0 WHERE status=?",
                             (JobStatus.IN_QUEUE.value, JobStatus.IN_PROGRESS.value))  # fmt: skip

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def submit(self, route: str, payload: dict[str, Any], webhook_url: str | None = None) -> Job:
        job = Job(secrets.token_hex(16), route, payload, JobStatus.IN_QUEUE, time.time(), webhook_url,
                  webhook_state="pending" if webhook_url else None)  # fmt: skip
        with self._lock:
            self._db.execute(
                "INSERT INTO jobs (id, route, payload, status, created_at, webhook_url, webhook_state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, route, json.dumps(payload), job.status.value, job.created_at, webhook_url, job.webhook_state),
            )
        return job

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id=?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def queue_position(self, job_id: str) -> int | None:
        """0 for the next job to start; None when the job is not queued."""
        with self._lock:
            row = self._db.execute("SELECT seq, status FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row[1] != JobStatus.IN_QUEUE.value:
                return None
            ahead = self._db.execute("SELECT COUNT(*) FROM jobs WHERE status=? AND seq<?",
                                     (JobStatus.IN_QUEUE.value, row[0])).fetchone()  # fmt: skip
        return int(ahead[0])

    def pending(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM jobs WHERE status=?",
                                        (JobStatus.IN_QUEUE.value,)).fetchone()[0])  # fmt: skip

    def claim_next(self) -> Job | None:
        """The oldest queued job, now IN_PROGRESS; None when the queue is empty."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE status=? ORDER BY seq LIMIT 1",
                                   (JobStatus.IN_QUEUE.value,)).fetchone()  # fmt: skip
            if row is None:
                return None
            now = time.time()
            self._db.execute("UPDATE jobs SET status=?, started_at=?, attempts=attempts+1 WHERE id=?",
                             (JobStatus.IN_PROGRESS.value, now, row[0]))  # fmt: skip
        job = _job(row)
        job.status, job.started_at, job.attempts = JobStatus.IN_PROGRESS, now, job.attempts + 1
        return job

    def progress(self, job_id: str, fraction: float, message: str) -> None:
        with self._lock:
            row = self._db.execute("SELECT logs FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None:
                return
            logs = json.loads(row[0])[-(MAX_LOGS - 1):] + [{"message": message, "timestamp": time.time()}]
            self._db.execute("UPDATE jobs SET progress=?, logs=? WHERE id=? AND status=?",
                             (fraction, json.dumps(logs), job_id, JobStatus.IN_PROGRESS.value))  # fmt: skip

    def finish(self, job_id: str, status: JobStatus, *, result: dict | None = None, error: dict | None = None) -> bool:
        """Record the outcome of a job not finished yet; False if it already was (e.g. canceled)."""
        assert status.is_finished
        with self._lock:
            cur = self._db.execute(
                "UPDATE jobs SET status=?, finished_at=?, result=?, error=?, progress=CASE WHEN ?='COMPLETED'"
                " THEN 1 ELSE progress END WHERE id=? AND status IN ('IN_QUEUE', 'IN_PROGRESS')",
                (status.value, time.time(), _dump(result), _dump(error), status.value, job_id),
            )
        return cur.rowcount == 1

    def requeue(self, job_id: str) -> None:
        """Put a running job back at its place in the queue (it starts over later)."""
        with self._lock:
            self._db.execute("UPDATE jobs SET status=?, progress=0 WHERE id=? AND status=?",
                             (JobStatus.IN_QUEUE.value, job_id, JobStatus.IN_PROGRESS.value))  # fmt: skip

    def set_webhook_state(self, job_id: str, state: str) -> None:
        with self._lock:
            self._db.execute("UPDATE jobs SET webhook_state=? WHERE id=?", (state, job_id))

    def undelivered(self) -> list[Job]:
        """Finished jobs whose webhook is still owed (a restart resumes their delivery)."""
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE webhook_state='pending' AND status IN "
                                    "('COMPLETED', 'FAILED', 'CANCELED') ORDER BY seq").fetchall()  # fmt: skip
        return [_job(r) for r in rows]


_COLUMNS = ("id, route, payload, status, created_at, webhook_url, started_at, finished_at, progress, logs,"
            " result, error, attempts, webhook_state")  # fmt: skip


def _dump(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value)


def _job(row: tuple) -> Job:
    (id_, route, payload, status, created, hook, started, finished, progress, logs, result, error, attempts,
     hook_state) = row  # fmt: skip
    return Job(id_, route, json.loads(payload), JobStatus(status), created, hook, started, finished, progress,
               json.loads(logs), None if result is None else json.loads(result),
               None if error is None else json.loads(error), attempts, hook_state)  # fmt: skip

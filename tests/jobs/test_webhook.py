"""Webhooks against a local receiver: retries with one idempotency key, private addresses refused."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from csm_voice_api.jobs.net import address_policy
from csm_voice_api.jobs.store import JobStatus, JobStore
from csm_voice_api.jobs.webhook import WebhookPolicy, WebhookSender


class Receiver(ThreadingHTTPServer):
    """Answers 500 to the first `fail` POSTs, then 204; records every attempt."""

    def __init__(self, fail: int):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail = fail
        self.attempts: list[tuple[dict[str, str], dict]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"


class _Handler(BaseHTTPRequestHandler):
    server: Receiver

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.attempts.append(({k.lower(): v for k, v in self.headers.items()}, body))
        self.send_response(500 if len(self.server.attempts) <= self.server.fail else 204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver(fail=2)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def finished_job(store: JobStore, url: str):
    job = store.submit("scene", {}, webhook_url=url)
    store.claim_next()
    store.finish(job.id, JobStatus.COMPLETED, result={"audio": {"url": "u"}})
    return store.get(job.id)


async def wait_state(store: JobStore, job_id: str) -> str:
    for _ in range(500):
        state = store.get(job_id).webhook_state  # type: ignore[union-attr]
        if state != "pending":
            return state  # type: ignore[return-value]
        await asyncio.sleep(0.02)
    raise AssertionError("webhook never settled")


async def test_retries_until_delivered_with_one_idempotency_key(tmp_path: Path, receiver: Receiver):
    store = JobStore(tmp_path / "jobs.db")
    job = finished_job(store, receiver.url)
    policy = WebhookPolicy(address_policy(["127.0.0.1"]), max_attempts=5, backoff_s=0.01, backoff_max_s=0.02)
    sender = WebhookSender(store, policy, lambda j: {"request_id": j.id, "status": j.status.value, "result": j.result})
    sender.deliver(job)
    assert await wait_state(store, job.id) == "delivered"
    assert len(receiver.attempts) == 3  # two 500s, then accepted
    assert {h["idempotency-key"] for h, _ in receiver.attempts} == {job.id}
    assert all(b == {"request_id": job.id, "status": "COMPLETED", "result": {"audio": {"url": "u"}}}
               for _, b in receiver.attempts)  # fmt: skip


async def test_gives_up_after_max_attempts(tmp_path: Path, receiver: Receiver):
    receiver.fail = 100
    store = JobStore(tmp_path / "jobs.db")
    job = finished_job(store, receiver.url)
    sender = WebhookSender(store, WebhookPolicy(address_policy(["127.0.0.1"]), max_attempts=3, backoff_s=0.0),
                           lambda j: {})  # fmt: skip
    sender.deliver(job)
    assert await wait_state(store, job.id) == "failed"
    assert len(receiver.attempts) == 3


async def test_private_address_refused_by_default_without_contact(tmp_path: Path, receiver: Receiver):
    store = JobStore(tmp_path / "jobs.db")
    job = finished_job(store, receiver.url)
    sender = WebhookSender(store, WebhookPolicy(address_policy([]), max_attempts=5, backoff_s=5.0), lambda j: {})
    sender.deliver(job)
    assert await wait_state(store, job.id) == "failed"  # at once: no backoff for a refused address
    assert receiver.attempts == []


def test_backoff_doubles_up_to_its_cap():
    policy = WebhookPolicy(address_policy([]), backoff_s=1.0, backoff_max_s=5.0)
    assert [policy.delay(i) for i in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]

"""JobWorker: runs queued jobs from the JobStore, oldest first, `workers` at a time.

A handler turns a job into its result dict and may report progress. Domain errors become a
FAILED job with the status and OpenAI error body the same request would have got directly; an
engine without a free slot puts the job back in the queue to try again shortly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from csm_voice_api.api.errors import error_body, status_of
from csm_voice_api.errors import CsmError, EngineDead, Overloaded
from csm_voice_api.jobs.store import Job, JobStatus, JobStore
from csm_voice_api.jobs.webhook import WebhookSender

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]
Handler = Callable[[Job, Progress], Awaitable[dict]]
OVERLOADED_RETRY_S = 1.0


class JobWorker:
    def __init__(self, store: JobStore, handlers: dict[str, Handler], *, workers: int = 1,
                 webhooks: WebhookSender | None = None):  # fmt: skip
        self.store = store
        self.handlers = handlers
        self.workers = workers
        self.webhooks = webhooks
        self._wake = asyncio.Event()
        self._loops: list[asyncio.Task] = []
        self._running: dict[str, asyncio.Task] = {}

    async def start(self) -> None:
        if self.webhooks is not None:
            for job in self.store.undelivered():
                self.webhooks.deliver(job)
        self._loops = [asyncio.create_task(self._loop()) for _ in range(self.workers)]

    async def stop(self) -> None:
        # Jobs cut short here stay IN_PROGRESS in the store: the next start runs them again.
        for task in self._loops:
            task.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        if self.webhooks is not None:
            await self.webhooks.close()

    def wake(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; False when it had already finished."""
        if not self.store.finish(job_id, JobStatus.CANCELED):
            return False
        task = self._running.get(job_id)
        if task is not None:
            task.cancel()  # closes the engine's generator: the GPU work stops within a frame
        job = self.store.get(job_id)
        if job is not None and job.webhook_url and self.webhooks is not None:
            self.webhooks.deliver(job)
        return True

    async def _loop(self) -> None:
        while True:
            job = self.store.claim_next()
            if job is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._run(job)

    async def _run(self, job: Job) -> None:
        handler = self.handlers.get(job.route)
        if handler is None:
            status, outcome = JobStatus.FAILED, {"error": failure(404, f"No queue route '{job.route}'.", "not_found")}
        else:
            task = asyncio.create_task(handler(job, lambda f, m: self.store.progress(job.id, f, m)))
            self._running[job.id] = task
            try:
                status, outcome = JobStatus.COMPLETED, {"result": await task}
            except asyncio.CancelledError:
                job_now = self.store.get(job.id)
                if not task.cancelled() or job_now is None or job_now.status is not JobStatus.CANCELED:
                    raise  # the worker itself is stopping
                return  # canceled by the client: already recorded
            except Overloaded:
                self.store.requeue(job.id)
                await asyncio.sleep(OVERLOADED_RETRY_S)
                return
            except Exception as e:  # noqa: BLE001 - every failure is recorded on the job
                status, outcome = JobStatus.FAILED, {"error": failure_of(e, job.id)}
            finally:
                self._running.pop(job.id, None)
        if self.store.finish(job.id, status, **outcome) and job.webhook_url and self.webhooks is not None:
            finished = self.store.get(job.id)
            if finished is not None:
                self.webhooks.deliver(finished)


def failure(status: int, message: str, code: str, param: str | None = None) -> dict:
    """A job's stored error: the status and OpenAI error body the direct request would have got."""
    return {"status": status, "body": error_body(message, status=status, param=param, code=code)}


def failure_of(e: Exception, job_id: str) -> dict:
    if isinstance(e, CsmError):
        return failure(status_of(e), e.message, e.code, e.param)
    if isinstance(e, EngineDead):
        return failure(503, f"The speech engine has stopped ({e}).", "engine_dead")
    log.error("queued job %s failed", job_id, exc_info=e)
    return failure(500, "The server had an error while processing your request.", "internal_error")

"""Webhook delivery: one POST per finished job, retried with capped exponential backoff.

Every attempt carries the same Idempotency-Key (the job id), so a receiver that got an attempt
whose answer was lost can tell the retry apart. A refused address is not retried.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from csm_voice_api.jobs.net import AddressPolicy, post_json
from csm_voice_api.jobs.store import Job, JobStore
from csm_voice_api.net.fetch import FetchError, UnsafeURL

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebhookPolicy:
    allow: AddressPolicy
    max_attempts: int = 5
    backoff_s: float = 1.0
    backoff_max_s: float = 60.0
    timeout_s: float = 10.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (0-based)."""
        return min(self.backoff_max_s, self.backoff_s * 2**attempt)


class WebhookSender:
    """Delivers finished jobs' webhooks in background tasks; `close()` stops them (a restart resumes)."""

    def __init__(self, store: JobStore, policy: WebhookPolicy, body: Callable[[Job], dict]):
        self.store = store
        self.policy = policy
        self.body = body
        self._tasks: set[asyncio.Task] = set()

    def deliver(self, job: Job) -> None:
        task = asyncio.create_task(self._deliver(job))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _deliver(self, job: Job) -> None:
        assert job.webhook_url is not None
        headers = {"Idempotency-Key": job.id, "User-Agent": "csm-voice-api-webhook"}
        payload = self.body(job)
        for attempt in range(self.policy.max_attempts):
            try:
                status = await post_json(job.webhook_url, payload, headers=headers, allow=self.policy.allow,
                                         timeout_s=self.policy.timeout_s)  # fmt: skip
                if 200 <= status < 300:
                    self.store.set_webhook_state(job.id, "delivered")
                    return
                log.info("webhook for %s answered %d (attempt %d)", job.id, status, attempt + 1)
            except UnsafeURL:
                break  # the address will not become public by waiting
            except (FetchError, httpx.HTTPError, OSError) as e:
                log.info("webhook for %s failed (attempt %d): %s", job.id, attempt + 1, type(e).__name__)
            if attempt + 1 < self.policy.max_attempts:
                await asyncio.sleep(self.policy.delay(attempt))
        log.warning("webhook for %s given up", job.id)
        self.store.set_webhook_state(job.id, "failed")

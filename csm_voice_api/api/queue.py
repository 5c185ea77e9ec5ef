"""The job queue: POST /v1/queue/{route}, then poll status, fetch the result, or cancel.

Jobs live in data_dir/jobs.sqlite3 (jobs/store.py): an accepted job survives a restart. The
router's lifespan (after the app's, so the engine is up) opens the store and starts the worker.
Results hold absolute audio URLs, built from the address the job was submitted to.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import Any

from fastapi import APIRouter, Body, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from csm_voice_api.api.errors import error_response
from csm_voice_api.api.models import CONTENT_TYPES, SpeechRequest
from csm_voice_api.api.scenes import SceneRequest, render_scene, with_absolute_url
from csm_voice_api.api.speech import _checked_input, _sampling
from csm_voice_api.api.speech_job import SpeechJob, split_text
from csm_voice_api.api.voice_resolver import VoiceContext, resolve_voice
from csm_voice_api.audio.encode import wav_header
from csm_voice_api.config import Settings
from csm_voice_api.engine.types import SAMPLE_RATE
from csm_voice_api.errors import NotFound, Overloaded
from csm_voice_api.jobs.net import address_policy, checked_target
from csm_voice_api.jobs.store import Job, JobStatus, JobStore
from csm_voice_api.jobs.webhook import WebhookPolicy, WebhookSender
from csm_voice_api.jobs.worker import JobWorker, Progress

MODELS: dict[str, type[BaseModel]] = {"scene": SceneRequest, "speech": SpeechRequest}


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    store = await asyncio.to_thread(JobStore, settings.jobs_db)
    policy = WebhookPolicy(address_policy(settings.fetch_allow_networks), settings.webhook_max_attempts,
                           settings.webhook_backoff_s, settings.webhook_backoff_max_s, settings.fetch_timeout_s)
    webhooks = WebhookSender(store, policy, webhook_body)
    handlers = {"scene": lambda job, p: _scene(app, job, p), "speech": lambda job, p: _speech(app, job, p)}
    worker = JobWorker(store, handlers, workers=settings.queue_workers, webhooks=webhooks)
    app.state.jobs, app.state.job_worker, app.state.webhook_allow = store, worker, policy.allow
    await worker.start()
    try:
        yield
    finally:
        await worker.stop()
        store.close()


router = APIRouter(lifespan=lifespan)


@router.post("/v1/queue/{route}")
async def submit(route: str, request: Request, body: dict[str, Any] = Body(...), webhook_url: str | None = None
                 ) -> dict:  # fmt: skip
    model = _model(route)
    webhook_url = body.pop("webhook_url", None) or webhook_url
    try:
        model.model_validate(body)
    except ValidationError as e:
        raise RequestValidationError(e.errors(include_url=False)) from None  # 422, as the direct route answers
    if route == "speech":
        _checked_input(body.get("input", ""), request.app.state.limits)
    if webhook_url is not None:
        await checked_target(webhook_url, request.app.state.webhook_allow, param="webhook_url")
    store: JobStore = request.app.state.jobs
    if store.pending() >= request.app.state.settings.queue_max_pending:
        raise Overloaded("The job queue is full; retry later.", retry_after=5.0)
    job = store.submit(route, {"request": body, "base_url": str(request.base_url)}, webhook_url)
    request.app.state.job_worker.wake()
    return {"request_id": job.id, **_urls(request, route, job.id)}


@router.get("/v1/queue/{route}/requests/{request_id}/status")
async def status(route: str, request_id: str, request: Request) -> dict:
    job = _job(request, route, request_id)
    out: dict[str, Any] = {"request_id": job.id, "status": job.status.value, **_urls(request, route, job.id)}
    if job.status is JobStatus.IN_QUEUE:
        out["queue_position"] = request.app.state.jobs.queue_position(job.id)
    if job.status is not JobStatus.IN_QUEUE:
        out["progress"], out["logs"] = job.progress, job.logs
    return out


@router.get("/v1/queue/{route}/requests/{request_id}", response_model=None)
async def result(route: str, request_id: str, request: Request) -> JSONResponse | dict:
    job = _job(request, route, request_id)
    if job.status is JobStatus.COMPLETED:
        return job.result or {}
    if job.status is JobStatus.FAILED and job.error:
        return JSONResponse(job.error["body"], status_code=job.error["status"])
    if job.status is JobStatus.CANCELED:
        return error_response("The request was canceled.", status=409, code="request_canceled")
    return JSONResponse(await status(route, request_id, request), status_code=202)


@router.put("/v1/queue/{route}/requests/{request_id}/cancel", response_model=None)
async def cancel(route: str, request_id: str, request: Request) -> JSONResponse | dict:
    job = _job(request, route, request_id)
    if not request.app.state.job_worker.cancel(job.id):
        return error_response(f"The request already finished ({job.status.value}).", status=409,
                              code="already_completed")  # fmt: skip
    return {"request_id": job.id, "status": "CANCELLATION_REQUESTED"}


def webhook_body(job: Job) -> dict:
    """What a job's webhook receives once it has finished."""
    error = job.error["body"]["error"] if job.error else None
    return {"request_id": job.id, "status": job.status.value, "result": job.result, "error": error}


def _model(route: str) -> type[BaseModel]:
    if route not in MODELS:
        raise NotFound(f"No queue route '{route}'; use one of {', '.join(MODELS)}.", param="route")
    return MODELS[route]


def _job(request: Request, route: str, request_id: str) -> Job:
    _model(route)
    job = request.app.state.jobs.get(request_id)
    if job is None or job.route != route:
        raise NotFound(f"No request '{request_id}' in the '{route}' queue.", param="request_id")
    return job


def _urls(request: Request, route: str, job_id: str) -> dict[str, str]:
    base = f"{str(request.base_url).rstrip('/')}/v1/queue/{route}/requests/{job_id}"
    return {"status_url": base + "/status", "response_url": base, "cancel_url": base + "/cancel"}


def _app_watermark(app: FastAPI):  # noqa: ANN202 - StreamWatermarker | None
    # Jobs run outside any request, so the request-scoped default (api/audio_out.py) is not set.
    wm = getattr(app.state, "watermark", None)
    return None if wm is None else wm.stream()


async def _scene(app: FastAPI, job: Job, progress: Progress) -> dict:
    body = SceneRequest.model_validate(job.payload["request"])
    result = await render_scene(app.state.engine, body, app.state.settings, app.state.outputs,
                                watermark=_app_watermark(app), progress=progress)  # fmt: skip
    return with_absolute_url(result, job.payload["base_url"])


async def _speech(app: FastAPI, job: Job, progress: Progress) -> dict:
    body = SpeechRequest.model_validate(job.payload["request"])
    settings, limits, engine = app.state.settings, app.state.limits, app.state.engine
    voice = await resolve_voice(body, VoiceContext(engine, limits, getattr(app.state, "voices", None)))
    speech = SpeechJob(engine, voice, split_text(_checked_input(body.input, limits)),
                       sampling=_sampling(body, settings, limits), fmt=body.response_format, speed=body.speed,
                       chunk_frames=settings.chunk_frames, watermark=_app_watermark(app))  # fmt: skip
    progress(0.0, "generating")
    async with aclosing(speech.run()) as chunks:
        data = b"".join([b async for b in chunks])
    if body.response_format == "wav":
        data = wav_header(SAMPLE_RATE, (len(data) - 44) // 2) + data[44:]
    name = await asyncio.to_thread(app.state.outputs.save, data, body.response_format)
    audio = {"url": f"/v1/audio/{name}", "content_type": CONTENT_TYPES[body.response_format], "file_name": name,
             "file_size": len(data)}  # fmt: skip
    result = {"audio": audio, "frames": speech.frames, "stop_reason": speech.stop_reason}
    return with_absolute_url(result, job.payload["base_url"])

"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}.

Domain exceptions (csm_voice_api.errors) are mapped to statuses here and nowhere else.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csm_voice_api.api import metrics
from csm_voice_api.errors import (
    ContextOverflow,
    CsmError,
    EngineDead,
    InputTooLong,
    InvalidInput,
    NotFound,
    Overloaded,
    UnsupportedMedia,
)

log = logging.getLogger(__name__)

# Most specific first: the first isinstance match wins.
_STATUS: tuple[tuple[type[CsmError], int], ...] = (
    (InputTooLong, 413),
    (UnsupportedMedia, 415),
    (ContextOverflow, 422),
    (NotFound, 404),
    (Overloaded, 429),
    (InvalidInput, 400),
)

_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


def error_body(message: str, *, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPE_BY_STATUS.get(status, "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    message: str,
    *,
    status: int,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(message, status=status, param=param, code=code), status_code=status, headers=headers)


def status_of(exc: CsmError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 400


def csm_error_response(exc: CsmError) -> JSONResponse:
    status = status_of(exc)
    headers = None
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after)))}
        metrics.REJECTIONS.labels(reason=exc.code).inc()
    return error_response(exc.message, status=status, param=exc.param, code=exc.code, headers=headers)


def engine_dead_response(exc: EngineDead) -> JSONResponse:
    return error_response(
        f"The speech engine has stopped ({exc or 'unknown cause'}); the server must be restarted.",
        status=503,
        code="engine_dead",
    )


async def _csm_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CsmError)
    return csm_error_response(exc)


async def _engine_dead(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EngineDead)
    return engine_dead_response(exc)


def _field(loc: tuple[Any, ...] | list[Any]) -> str | None:
    # loc is (source, field, then union-member tags and nested keys): name the request field only.
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return parts[0] if parts else None


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        return error_response(
            "We could not parse the JSON body of your request. Send valid JSON with Content-Type: application/json.",
            status=400,
            code="invalid_json",
        )
    param = _field(first.get("loc", ()))
    message = first.get("msg", "Invalid request.")
    if param:
        message = f"{message} (field '{param}')"
    return error_response(message, status=422, param=param, code=str(first.get("type", "invalid_value")))


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    message = exc.detail if isinstance(exc.detail, str) else "Request failed."
    return error_response(message, status=exc.status_code, code=_HTTP_CODES.get(exc.status_code), headers=exc.headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 401: "invalid_api_key"}


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the client.
    log.error("unhandled error", exc_info=exc)
    return error_response("The server had an error while processing your request.", status=500, code="internal_error")


def install(app: FastAPI) -> None:
    """Register every handler on `app`, so routes just raise."""
    app.add_exception_handler(CsmError, _csm_error)
    app.add_exception_handler(EngineDead, _engine_dead)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)


class BodyLimit:
    """ASGI wrapper: 413 for bodies over `max_bytes`, from Content-Length or while the body streams in.

    The body is read here (bounded by the limit) and replayed to the app, so an oversize upload is
    refused before the app parses any of it; later receives (disconnects) pass straight through.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", ())).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before sending its body
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            f"Request body is larger than {self.max_bytes} bytes (CSM_MAX_BODY_BYTES).",
            status=413,
            code="body_too_large",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay

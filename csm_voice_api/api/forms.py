"""Multipart parsing limits on every route, on every FastAPI version we support.

Starlette parses forms with 1000 files, 1000 fields and 1 MiB per field unless told otherwise.
FastAPI >= 0.165 takes `form_limits`, but the versions that still run on Python 3.10 (what the
lock pins) do not. So this ASGI wrapper parses a multipart body with our limits before the app
does: a violation is a 400 in the OpenAI error shape, otherwise the body is replayed untouched.
It sits inside BodyLimit, so what it buffers is already bounded by CSM_MAX_BODY_BYTES.
"""

from __future__ import annotations

from typing import Any

from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csm_voice_api.api.errors import _replay, error_response

# Uploads carry one clip and a few fields. max_part_size bounds each non-file field; files are
# bounded by CSM_MAX_BODY_BYTES and CSM_MAX_UPLOAD_BYTES.
FORM_LIMITS: dict[str, Any] = {"max_files": 2, "max_fields": 32, "max_part_size": 64 * 1024}


class FormLimit:
    def __init__(self, app: ASGIApp, limits: dict[str, Any] = FORM_LIMITS):
        self.app, self.limits = app, limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctype = dict(scope.get("headers", ())).get(b"content-type", b"")
        if scope["type"] != "http" or not ctype.startswith(b"multipart/form-data"):
            await self.app(scope, receive, send)
            return
        chunks: list[bytes] = []
        while True:
            message: Message = await receive()
            if message["type"] != "http.request":
                return  # the client left
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        request = Request(scope, _replay(body, receive))
        try:
            form = await request.form(**self.limits)
            await form.close()  # spooled temp files go now; the app parses its own copy
        except (MultiPartException, HTTPException) as exc:  # Starlette wraps it when scope has an app
            message = exc.message if isinstance(exc, MultiPartException) else exc.detail
            await error_response(f"{message} Send one audio file and the documented fields.",
                                 status=400, code="too_many_parts")(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

"""The voice-cloning web UI: one static page and its two assets, shipped inside the package.

Public (no API key): the page holds no data; its calls to /v1 carry the key the user types in.
Assets are served from a fixed list rather than a StaticFiles mount, because FastAPI's
include_router copies routes but drops mounts, and the app adds features as routers.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from csm_voice_api.errors import NotFound

router = APIRouter(include_in_schema=False)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
ASSETS: dict[str, str] = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Everything the page loads comes from this server; audio it plays is blob: URLs it made itself.
_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; connect-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
# no-cache = revalidate each time: an upgraded server never runs a stale app.js against new routes.
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


@router.get("/voice-cloning")
async def page() -> FileResponse:
    headers = {**_HEADERS, "Content-Security-Policy": _CSP}
    return FileResponse(WEB_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)


@router.get("/voice-cloning/")
async def page_slash() -> RedirectResponse:
    # Relative asset URLs in the page resolve against /voice-cloning, not /voice-cloning/.
    return RedirectResponse("/voice-cloning", status_code=308)


@router.get("/voice-cloning/static/{name}")
async def asset(name: str) -> FileResponse:
    if name not in ASSETS:
        raise NotFound(f"No web asset named {name!r}.", param="name")
    return FileResponse(WEB_DIR / name, media_type=ASSETS[name], headers=_HEADERS)

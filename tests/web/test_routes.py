"""The web UI's routes at the ASGI boundary: the page and its assets are served from the package,
load nothing from elsewhere, and stay reachable when API keys guard /v1."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from csm_voice_api.api.web import ASSETS, WEB_DIR
from csm_voice_api.app import build_app
from csm_voice_api.config import Settings

# Anything that would make the browser fetch from another origin: absolute or protocol-relative
# URLs in src/href/url(), CSS @import, or a fetch() of an absolute URL.
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["'](?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import|fetch\(\s*["'`]https?:""")


@pytest.fixture
async def web(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    # No lifespan and no engine: these routes are static, and auth runs before routing.
    settings = Settings(_env_file=None, model="demo", device="cpu", data_dir=tmp_path, api_keys=["sk-test"],
                        warmup=False)
    app = build_app(settings, engine=object())  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
        yield c


async def test_page_and_assets_are_served_without_a_key(web):
    page = await web.get("/voice-cloning")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    referenced = re.findall(r"""(?:src|href)="(voice-cloning/static/[^"]+)\"""", page.text)
    assert sorted(referenced) == sorted(f"voice-cloning/static/{name}" for name in ASSETS)
    for path in referenced:
        r = await web.get(f"/{path}")
        assert r.status_code == 200, path
        assert r.headers["content-type"] == ASSETS[path.rsplit("/", 1)[1]]
        assert r.content == (WEB_DIR / path.rsplit("/", 1)[1]).read_bytes()
    # The page's data stays behind the key.
    assert (await web.get("/v1/voice-cloning/voices")).status_code == 401


async def test_trailing_slash_redirects_so_relative_urls_resolve(web):
    r = await web.get("/voice-cloning/")
    assert (r.status_code, r.headers["location"]) == (308, "/voice-cloning")


@pytest.mark.parametrize("name", ["missing.js", "..%2Fweb.py", "index.html"])
async def test_only_listed_assets_are_served(web, name):
    r = await web.get(f"/voice-cloning/static/{name}")
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "not_found_error"


@pytest.mark.parametrize("name", ["index.html", *ASSETS])
def test_nothing_is_loaded_from_another_origin(name):
    text = (WEB_DIR / name).read_text()
    assert EXTERNAL.findall(text) == []

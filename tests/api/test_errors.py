"""Every error is OpenAI-shaped with the right status: bad input, limits, unknown routes, crashes."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter

from csm_voice_api.app import build_app
from csm_voice_api.errors import ContextOverflow, EngineDead, NotFound, Overloaded, UnsupportedMedia

OK = {"model": "csm-1b", "voice": "alloy", "input": "Hi.", "max_audio_length_ms": 160}


def assert_openai_error(r: httpx.Response, status: int, param: str | None = "<any>") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    if param != "<any>":
        assert err["param"] == param
    return err


@pytest.mark.parametrize(
    ("patch", "status", "param"),
    [
        ({"input": ""}, 400, "input"),
        ({"input": "   \n"}, 400, "input"),
        ({"input": "a" * 4097}, 413, "input"),
        ({"response_format": "ogg"}, 422, "response_format"),
        ({"speed": 4.5}, 422, "speed"),
        ({"speed": 0.1}, 422, "speed"),
        ({"voice": "nobody"}, 404, "voice"),
        ({"voice": {"name": "x"}}, 422, "voice"),
        ({"stream_format": "chunks"}, 422, "stream_format"),
        ({"temperature": -1}, 422, "temperature"),
        ({"max_audio_length_ms": 10_000_000}, 413, "max_audio_length_ms"),
        ({"voice_sample": "abcd"}, 400, "voice"),
    ],
)
async def test_bad_speech_requests(client, patch, status, param):
    assert_openai_error(await client.post("/v1/audio/speech", json={**OK, **patch}), status, param)


async def test_missing_input_names_the_field(client):
    body = {k: v for k, v in OK.items() if k != "input"}
    err = assert_openai_error(await client.post("/v1/audio/speech", json=body), 422, "input")
    assert err["code"] == "missing"


async def test_input_at_the_limit_is_accepted(client):
    r = await client.post("/v1/audio/speech", json={**OK, "input": "a " * 2048, "stream": False})
    assert r.status_code == 200, r.text


async def test_malformed_json_is_400(client):
    r = await client.post("/v1/audio/speech", content=b'{"input": "hi",', headers={"content-type": "application/json"})
    err = assert_openai_error(r, 400, None)
    assert err["code"] == "invalid_json"


async def test_unknown_route_and_method(client):
    assert assert_openai_error(await client.get("/v1/nothing"), 404)["type"] == "not_found_error"
    assert_openai_error(await client.get("/v1/audio/speech"), 405)


async def test_oversize_body_by_content_length(client, settings_factory, engine):
    app = build_app(settings_factory(max_body_bytes=4096), engine)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/audio/speech", json={**OK, "input": "x" * 5000})
    assert assert_openai_error(r, 413, None)["code"] == "body_too_large"


async def test_oversize_body_streamed_without_length(settings_factory, engine):
    app = build_app(settings_factory(max_body_bytes=4096), engine)
    sent = []

    async def body():
        for _ in range(100):  # 100 KiB offered, refused after a little over 4 KiB
            sent.append(1)
            yield b"x" * 1024

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post("/v1/audio/speech", content=body(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    assert assert_openai_error(r, 413, None)["code"] == "body_too_large"
    assert len(sent) < 10  # refused early, not after reading everything


def _raising_app(settings, engine, exc: BaseException):
    app = build_app(settings, engine)
    router = APIRouter()

    @router.get("/boom")
    async def boom():
        raise exc

    app.include_router(router)
    return app


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (UnsupportedMedia("bad file"), 415, "unsupported_media"),
        (ContextOverflow("too long for the window"), 422, "context_length_exceeded"),
        (NotFound("gone"), 404, "not_found"),
        (EngineDead("loop died"), 503, "engine_dead"),
    ],
)
async def test_domain_errors_map_once(settings, engine, exc, status, code):
    app = _raising_app(settings, engine, exc)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        err = assert_openai_error(await c.get("/boom"), status)
    assert err["code"] == code


async def test_overloaded_is_429_with_retry_after(settings, engine):
    app = _raising_app(settings, engine, Overloaded("busy", retry_after=2.5))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/boom")
    assert assert_openai_error(r, 429)["type"] == "rate_limit_error"
    assert r.headers["retry-after"] == "3"


async def test_unexpected_error_is_500_without_internals(settings, engine):
    app = _raising_app(settings, engine, RuntimeError("secret /etc/path detail"))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        r = await c.get("/boom")
    err = assert_openai_error(r, 500, None)
    assert "secret" not in r.text and "RuntimeError" not in r.text
    assert err["type"] == "server_error"


async def test_api_keys_guard_v1_but_not_health(settings_factory, engine):
    app = build_app(settings_factory(api_keys="k1, k2"), engine)
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            # Protected: anything not listed public. The voice list is public (Open WebUI lists it keyless).
            assert_openai_error(await c.get("/v1/streaming-session/nope"), 401)
            assert_openai_error(await c.get("/v1/streaming-session/nope", headers={"Authorization": "Bearer k3"}), 401)
            ok = await c.get("/v1/streaming-session/nope", headers={"Authorization": "Bearer k2"})
            assert ok.status_code == 404
            assert (await c.get("/v1/audio/voices")).status_code == 200
            assert (await c.get("/health")).status_code == 200

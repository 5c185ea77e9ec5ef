"""API keys, WebSocket auth and origins, CORS and per-key rate limits, against a live server."""

from __future__ import annotations

import json
import logging

import anyio
import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from csm_voice_api.api import security
from csm_voice_api.api.security import ApiKeys, RateLimiter, Tickets, key_id

from .conftest import KEY, OTHER_KEY, bearer

SPEECH = {"input": "Hi.", "voice": "alloy", "response_format": "pcm", "max_audio_length_ms": 160, "stream": False}


@pytest.fixture
def keyed(live_factory):
    return live_factory(api_keys=f"{KEY},{OTHER_KEY}", ws_origins="https://app.example")


def test_protected_routes_need_a_valid_key(keyed):
    for headers in ({}, bearer("sk-wrong"), {"Authorization": KEY}, {"Authorization": "Basic " + KEY}):
        r = httpx.post(keyed.url + "/v1/audio/speech", json=SPEECH, headers=headers)
        assert r.status_code == 401, headers
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["www-authenticate"] == "Bearer"
    # Keys in the query string are not accepted (they would end up in access logs).
    assert httpx.post(keyed.url + f"/v1/audio/speech?api_key={KEY}", json=SPEECH).status_code == 401
    r = httpx.post(keyed.url + "/v1/audio/speech", json=SPEECH, headers=bearer(OTHER_KEY), timeout=60)
    assert r.status_code == 200 and int(r.headers["x-audio-frames"]) >= 1


def test_public_paths_are_exactly_the_listed_reads(keyed):
    for path in ("/health", "/ready", "/metrics", "/v1/models", "/v1/audio/voices", "/openapi.json"):
        assert httpx.get(keyed.url + path).status_code == 200, path
    # Writing to a public path, unknown paths and the rest of /v1 are not public.
    assert httpx.post(keyed.url + "/v1/audio/voices", json={}).status_code == 401
    assert httpx.get(keyed.url + "/v1/no-such-route").status_code == 401
    assert httpx.get(keyed.url + "/v1/streaming-session/x").status_code == 401
    assert httpx.get(keyed.url + "/v1/audio/abc.wav").status_code == 401


def test_metrics_can_be_made_private(live_factory):
    live = live_factory(api_keys=KEY, public_metrics=False)
    assert httpx.get(live.url + "/metrics").status_code == 401
    assert httpx.get(live.url + "/metrics", headers=bearer()).status_code == 200


def test_keys_never_reach_the_logs(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in ("uvicorn.access", "uvicorn.error", "csm_voice_api")]
    for lg in loggers:
        lg.addHandler(caplog.handler)
    try:
        httpx.post(keyed.url + "/v1/audio/speech", json=SPEECH, headers=bearer("sk-wrong-secret"))
        httpx.post(keyed.url + "/v1/audio/speech", json=SPEECH, headers=bearer(KEY), timeout=60)
    finally:
        for lg in loggers:
            lg.removeHandler(caplog.handler)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert KEY not in text and "sk-wrong-secret" not in text


def test_key_matching_is_exact_and_names_keys_by_digest():
    keys = ApiKeys([KEY, OTHER_KEY])
    assert keys.match(KEY) == key_id(KEY) and keys.match(OTHER_KEY) == key_id(OTHER_KEY)
    for wrong in ("", KEY[:-1], KEY + "x", KEY.upper(), " " + KEY):
        assert keys.match(wrong) is None
    assert KEY not in key_id(KEY) and len(key_id(KEY)) == 12


async def _ws_status(url: str, **kw) -> int:
    with pytest.raises(InvalidStatus) as e:
        async with connect(url, **kw):
            pass
    return e.value.response.status_code


async def test_websocket_auth_happens_before_the_session_is_touched(keyed, engine):
    sid = keyed.open_session(headers=bearer())
    session = keyed.app.state.sessions.get(sid)
    url = f"{keyed.ws_url}/v1/ws/stream-text/{sid}"
    assert await _ws_status(url) == 401
    assert await _ws_status(url, additional_headers=bearer("sk-wrong")) == 401
    assert await _ws_status(url, subprotocols=["csm", "bearer.sk-wrong"]) == 401
    assert await _ws_status(url + "?ticket=made-up") == 401
    assert session.attached == 0 and session.segments == 0  # nothing reached the session
    assert engine.stats()["active"] == 0

    async with connect(url, additional_headers=bearer()) as ws:
        await ws.send(json.dumps({"text_chunk": "Hi.", "is_final": True}))
        assert await _until_done(ws)
    url2 = f"{keyed.ws_url}/v1/ws/stream-text/{keyed.open_session(headers=bearer())}"
    async with connect(url2, subprotocols=["csm", f"bearer.{KEY}"]) as ws:
        assert ws.subprotocol == "csm"  # the key is never echoed back
        await ws.send(json.dumps({"flush": True}))


async def test_websocket_tickets_work_once(keyed):
    sid = keyed.open_session(headers=bearer())
    url = f"{keyed.ws_url}/v1/ws/stream-text/{sid}"
    assert httpx.post(keyed.url + "/v1/ws-ticket").status_code == 401
    ticket = httpx.post(keyed.url + "/v1/ws-ticket", headers=bearer()).json()["ticket"]
    async with connect(f"{url}?ticket={ticket}") as ws:
        await ws.send(json.dumps({"flush": True}))
    assert await _ws_status(f"{url}?ticket={ticket}") == 401  # single use


async def test_websocket_origins(keyed):
    def url() -> str:  # a session per connection: a closing socket holds its session a moment
        return f"{keyed.ws_url}/v1/ws/stream-text/{keyed.open_session(headers=bearer())}"

    assert await _ws_status(url(), origin="https://evil.example", additional_headers=bearer()) == 403
    host = keyed.url.removeprefix("http://")
    for origin in ("https://app.example", f"http://{host}"):  # allowlisted; the server's own
        async with connect(url(), origin=origin, additional_headers=bearer()) as ws:
            await ws.send(json.dumps({"flush": True}))


async def _until_done(ws) -> bool:
    with anyio.fail_after(60):
        while True:
            msg = await ws.recv()
            if isinstance(msg, str) and json.loads(msg)["type"] == "done":
                return True


def test_cors_is_off_by_default_and_configurable(live_factory):
    plain = live_factory()
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
           "Access-Control-Request-Headers": "authorization,content-type"}
    r = httpx.options(plain.url + "/v1/audio/speech", headers=pre)
    assert "access-control-allow-origin" not in r.headers
    cors = live_factory(api_keys=KEY, cors_origins="https://app.example")
    r = httpx.options(cors.url + "/v1/audio/speech", headers=pre)  # preflight: no key needed
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example"
    r = httpx.options(cors.url + "/v1/audio/speech", headers={**pre, "Origin": "https://evil.example"})
    assert r.headers.get("access-control-allow-origin") != "https://evil.example"
    r = httpx.get(cors.url + "/v1/models", headers={"Origin": "https://app.example"})
    assert r.headers["access-control-allow-origin"] == "https://app.example"


def test_rate_limit_is_per_key_with_retry_after(live_factory):
    live = live_factory(api_keys=f"{KEY},{OTHER_KEY}", rate_limit_per_minute=2)
    path = live.url + "/v1/streaming-session/none"  # cheap: 404 after auth
    assert [httpx.get(path, headers=bearer()).status_code for _ in range(2)] == [404, 404]
    r = httpx.get(path, headers=bearer())
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(r.headers["retry-after"]) <= 30  # one request per 30 s at 2 a minute
    assert httpx.get(path, headers=bearer(OTHER_KEY)).status_code == 404  # its own bucket
    assert httpx.get(live.url + "/health").status_code == 200  # probes are never limited


def test_rate_limiter_refills_and_bounds_memory():
    lim = RateLimiter(60, burst=2)  # one a second
    assert [lim.take("a", now=0.0) for _ in range(2)] == [0.0, 0.0]
    assert lim.take("a", now=0.0) == pytest.approx(1.0)
    assert lim.take("a", now=0.5) == pytest.approx(0.5)
    assert lim.take("a", now=1.01) == 0.0
    for i in range(20_000):
        lim.take(f"addr:{i}", now=100.0 + i)
    assert len(lim._buckets) <= 10_000


def test_tickets_expire():
    t = Tickets(ttl_s=0.0)
    assert t.redeem(t.issue("k")) is None
    t = Tickets(ttl_s=60)
    ticket = t.issue("k")
    assert t.redeem(ticket) == "k" and t.redeem(ticket) is None


async def test_a_refused_handshake_is_not_logged_as_an_error(keyed, caplog):
    # uvicorn logs denial responses as incomplete handshakes at ERROR (Kludex/uvicorn PR #3138).
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    sid = keyed.open_session(headers=bearer())
    assert await _ws_status(f"{keyed.ws_url}/v1/ws/stream-text/{sid}", additional_headers=bearer("sk-wrong")) == 401
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []
    # Outside a refusal the same record still passes: an app that leaves a handshake open is a bug.
    record = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, security._INCOMPLETE, None, None)
    assert security.RefusedHandshakeFilter().filter(record)

"""Who may call the server: API keys, WebSocket tickets and origins, per-key rate limits.

`SecurityMiddleware` runs before routing, so a refused request or WebSocket never reaches a
route (no body parsed, no session touched, no engine slot taken). Every path needs a key when
CSM_API_KEYS is set, except those listed in `public_paths`: new routes are protected by default.
Keys are compared as SHA-256 digests with `hmac.compare_digest` and never logged; logs and rate
limit buckets use a short digest prefix (`key_id`) instead.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from fastapi import APIRouter, Request
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from csm_voice_api.api import metrics
from csm_voice_api.api.errors import error_response

log = logging.getLogger(__name__)

# Set in the connection's task when this app refused its WebSocket handshake (see below).
_REFUSED_HANDSHAKE: ContextVar[bool] = ContextVar("csm_refused_handshake", default=False)
_INCOMPLETE = "ASGI callable returned without completing handshake."


class RefusedHandshakeFilter(logging.Filter):
    """uvicorn's websockets-sansio protocol logs every handshake refused with a denial response
    (our 401/403/429 before accept) as an incomplete handshake at ERROR, although the client got
    the response and nothing failed (Kludex/uvicorn PR #3138, open). Alerting on ERROR would fire
    on every bad token, so that record is dropped when this app refused the handshake itself; an
    app that really returns without completing one still logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_REFUSED_HANDSHAKE.get() and record.getMessage() == _INCOMPLETE)


_UVICORN_FILTER = RefusedHandshakeFilter()
logging.getLogger("uvicorn.error").addFilter(_UVICORN_FILTER)  # one instance: adding it again is a no-op

# Open to anyone for GET/HEAD: probes, docs, the web UI page, and the lists Open WebUI fetches
# before it knows any key. Exact paths; prefixes only for the UI's static assets.
PUBLIC_PATHS: frozenset[str] = frozenset({
    "/health", "/ready",
    "/v1/models", "/v1/audio/models", "/v1/audio/voices", "/v1/audio/speech/response-formats",
    "/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc",
    "/voice-cloning", "/voice-cloning/", "/favicon.ico",
})  # fmt: skip
PUBLIC_PREFIXES: tuple[str, ...] = ("/voice-cloning/static/",)

WS_KEY_PROTOCOL = "bearer."  # Sec-WebSocket-Protocol: csm, bearer.<key> (browsers cannot set headers)
WS_PROTOCOL = "csm"  # the subprotocol the server answers with; the key is never echoed
TICKET_TTL_S = 60.0
MAX_BUCKETS = 10_000
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


def key_id(key: str) -> str:
    """A short, non-reversible name for a key, safe for logs and metrics."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]


class ApiKeys:
    """The accepted keys. `match` compares against every key, with no early exit."""

    def __init__(self, keys: list[str]):
        self._digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def match(self, given: str) -> str | None:
        d = hashlib.sha256(given.encode()).digest()
        found: bytes | None = None
        for kd in self._digests:
            if hmac.compare_digest(d, kd):
                found = kd
        return found.hex()[:12] if found is not None else None


class Tickets:
    """Single-use, short-lived WebSocket tickets (`?ticket=`), so a browser never puts a key in a URL."""

    def __init__(self, ttl_s: float = TICKET_TTL_S):
        self.ttl_s = ttl_s
        self._items: dict[str, tuple[str, float]] = {}

    def issue(self, owner: str) -> str:
        now = time.monotonic()
        self._items = {t: v for t, v in self._items.items() if v[1] > now}  # drop expired ones
        ticket = secrets.token_urlsafe(24)
        self._items[ticket] = (owner, now + self.ttl_s)
        return ticket

    def redeem(self, ticket: str) -> str | None:
        owner, expires = self._items.pop(ticket, ("", 0.0))
        return owner if expires > time.monotonic() else None


class RateLimiter:
    """Token buckets per caller: `rate_per_min` sustained, `burst` at once."""

    def __init__(self, rate_per_min: int, burst: int = 0):
        self.rate = rate_per_min / 60.0
        self.burst = float(burst or rate_per_min)
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)

    def take(self, caller: str, now: float | None = None) -> float:
        """0 when allowed; else seconds until the caller may try again."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic() if now is None else now
        tokens, at = self._buckets.get(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            return (1.0 - tokens) / self.rate
        if len(self._buckets) >= MAX_BUCKETS and caller not in self._buckets:
            self._prune(now)
        self._buckets[caller] = (tokens - 1.0, now)
        return 0.0

    def _prune(self, now: float) -> None:
        # Full buckets carry no state: forgetting them changes nothing. Then the oldest half.
        full = [c for c, (t, at) in self._buckets.items() if t + (now - at) * self.rate >= self.burst]
        for c in full:
            del self._buckets[c]
        if len(self._buckets) >= MAX_BUCKETS:
            for c in sorted(self._buckets, key=lambda c: self._buckets[c][1])[: MAX_BUCKETS // 2]:
                del self._buckets[c]


@dataclass
class SecurityPolicy:
    keys: ApiKeys
    public_paths: frozenset[str] = PUBLIC_PATHS
    public_prefixes: tuple[str, ...] = PUBLIC_PREFIXES
    ws_origins: tuple[str, ...] = ()
    limiter: RateLimiter = field(default_factory=lambda: RateLimiter(0))
    tickets: Tickets = field(default_factory=Tickets)
    ws_max_message_bytes: int = 64 * 1024

    def is_public(self, path: str) -> bool:
        return path in self.public_paths or path.startswith(self.public_prefixes)

    def origin_allowed(self, origin: str | None, host: str | None) -> bool:
        """No Origin (not a browser), the server's own origin, or one on the allowlist."""
        if origin is None or "*" in self.ws_origins or origin in self.ws_origins:
            return True
        return host is not None and urlsplit(origin).netloc.lower() == host.lower()


@dataclass
class _Refusal:
    status: int
    message: str
    code: str
    retry_after: float | None = None

    def headers(self) -> dict[str, str]:
        h = {"Retry-After": str(max(1, math.ceil(self.retry_after)))} if self.retry_after is not None else {}
        if self.status == 401:
            h["WWW-Authenticate"] = "Bearer"
        return h


class SecurityMiddleware:
    """ASGI: authenticate, check WebSocket origins, rate limit, cap WebSocket message size."""

    def __init__(self, app: ASGIApp, policy: SecurityPolicy):
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        refusal = self._check(scope, headers)
        if refusal is not None:
            metrics.REJECTIONS.labels(reason=refusal.code).inc()
            refuse = self._refuse_ws if scope["type"] == "websocket" else self._refuse_http
            await refuse(scope, receive, send, refusal)
            return
        if scope["type"] == "websocket":
            receive, send = self._ws_guard(headers, receive, send)
        await self.app(scope, receive, send)

    def _check(self, scope: Scope, headers: dict[str, str]) -> _Refusal | None:
        p = self.policy
        ws = scope["type"] == "websocket"
        if ws and not p.origin_allowed(headers.get("origin"), headers.get("host")):
            return _Refusal(403, "This Origin may not open WebSockets here (CSM_WS_ORIGINS).", "origin_not_allowed")
        if not ws and scope["method"] in ("GET", "HEAD") and p.is_public(scope["path"]):
            return None  # reading only: POST /v1/audio/voices (create a voice) still needs a key
        caller = self._caller(scope, headers)
        if caller is None:
            how = "'Authorization: Bearer <key>'" + (", a 'bearer.<key>' subprotocol or ?ticket=" if ws else "")
            return _Refusal(401, f"Missing or invalid API key. Send {how} with a key from CSM_API_KEYS.",
                            "invalid_api_key")
        scope.setdefault("state", {})["key_id"] = caller
        wait = p.limiter.take(caller)
        if wait > 0:
            return _Refusal(429, "Rate limit reached for this API key; retry after the time in Retry-After.",
                            "rate_limit_exceeded", retry_after=wait)
        return None

    def _caller(self, scope: Scope, headers: dict[str, str]) -> str | None:
        """The key id of an authenticated caller (the client address when auth is off); None: refused."""
        p = self.policy
        if not p.keys:
            client = scope.get("client")
            return f"addr:{client[0]}" if client else "addr:?"
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return p.keys.match(auth[7:].strip())
        if scope["type"] != "websocket":
            return None
        for proto in _protocols(headers):
            if proto.startswith(WS_KEY_PROTOCOL):
                return p.keys.match(proto[len(WS_KEY_PROTOCOL):])
        ticket = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("ticket")
        return p.tickets.redeem(ticket[0]) if ticket else None

    def _ws_guard(self, headers: dict[str, str], receive: Receive, send: Send) -> tuple[Receive, Send]:
        """Answer with a key-free subprotocol, and close with 1009 on an oversized message."""
        offered = _protocols(headers)
        limit = self.policy.ws_max_message_bytes
        closed = False

        async def guarded_send(message: Message) -> None:
            if closed:
                raise OSError("the socket was closed for an oversized message")
            if message["type"] == "websocket.accept" and offered and not message.get("subprotocol"):
                safe = [p for p in offered if not p.startswith(WS_KEY_PROTOCOL)]
                message = {**message, "subprotocol": safe[0] if safe else None}
            await send(message)

        async def guarded_receive() -> Message:
            nonlocal closed
            message = await receive()
            if message["type"] == "websocket.receive" and _size(message) > limit:
                closed = True
                metrics.REJECTIONS.labels(reason="ws_message_too_big").inc()
                await send({"type": "websocket.close", "code": CLOSE_TOO_BIG,
                            "reason": f"Message over {limit} bytes (CSM_WS_MAX_MESSAGE_BYTES)."})
                return {"type": "websocket.disconnect", "code": CLOSE_TOO_BIG}
            return message

        return guarded_receive, guarded_send

    @staticmethod
    async def _refuse_http(scope: Scope, receive: Receive, send: Send, r: _Refusal) -> None:
        await error_response(r.message, status=r.status, code=r.code, headers=r.headers())(scope, receive, send)

    @staticmethod
    async def _refuse_ws(scope: Scope, receive: Receive, send: Send, r: _Refusal) -> None:
        # Refused during the handshake: an HTTP status where the server supports it, else a close.
        if "websocket.http.response" in scope.get("extensions", {}):
            _REFUSED_HANDSHAKE.set(True)  # uvicorn's task sees it after the app returns
            response = error_response(r.message, status=r.status, code=r.code, headers=r.headers())
            await send({"type": "websocket.http.response.start", "status": r.status,
                        "headers": response.raw_headers})
            await send({"type": "websocket.http.response.body", "body": response.body})
        else:
            await send({"type": "websocket.close", "code": CLOSE_POLICY, "reason": r.message[:120]})


def _protocols(headers: dict[str, str]) -> list[str]:
    return [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",") if p.strip()]


def _size(message: Message) -> int:
    if message.get("bytes") is not None:
        return len(message["bytes"])
    text = message.get("text") or ""
    return len(text) if len(text) * 4 <= 64 * 1024 else len(text.encode())


def build_policy(settings) -> SecurityPolicy:  # noqa: ANN001 - Settings, kept import-light
    public = PUBLIC_PATHS | ({"/metrics"} if settings.public_metrics else set())
    return SecurityPolicy(
        keys=ApiKeys(settings.api_keys),
        public_paths=frozenset(public),
        ws_origins=tuple(settings.ws_origins),
        limiter=RateLimiter(settings.rate_limit_per_minute, settings.rate_limit_burst),
        ws_max_message_bytes=settings.ws_max_message_bytes,
    )


# ---- POST /v1/ws-ticket: a browser trades its key (in a header) for a one-use ticket ------------
router = APIRouter()


class Ticket(BaseModel):
    ticket: str
    expires_in: float  # seconds; the ticket works once


@router.post("/v1/ws-ticket")
async def issue_ticket(request: Request) -> Ticket:
    policy: SecurityPolicy = request.app.state.security
    owner = request.scope.get("state", {}).get("key_id", "anonymous")
    return Ticket(ticket=policy.tickets.issue(owner), expires_in=policy.tickets.ttl_s)


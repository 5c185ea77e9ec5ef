"""Fetch a URL a stranger gave us (audio_url, webhooks, scenes) without letting it reach inside.

Rules: http(s) only; the host is resolved once, every address it resolves to must be public
(no loopback, private, link-local, CGNAT, metadata, multicast, reserved, nor IPv6 forms that embed
an IPv4 address), and the connection goes to the address we checked, never to a fresh lookup
(so DNS rebinding cannot swap it). Redirects are followed by hand, each hop checked the same way.
Bytes and wall time are capped; proxies from the environment are ignored.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import anyio
import httpx

from csm_voice_api.errors import InputTooLong, InvalidInput

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]

REDIRECTS = (301, 302, 303, 307, 308)
# Also refused by `is_global`; listed so the policy reads plainly and survives stdlib changes.
_BLOCKED = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "64:ff9b::/96", "64:ff9b:1::/48", "fc00::/7", "fe80::/10", "ff00::/8",
))  # fmt: skip


class FetchError(InvalidInput):
    """The URL could not be fetched (unreachable, HTTP error, too slow). -> 400"""

    code = "fetch_failed"


class UnsafeURL(FetchError):
    """The URL points somewhere we never connect to (non-http scheme, non-public address). -> 400"""

    code = "unsafe_url"


@dataclass(frozen=True)
class Fetched:
    content: bytes
    content_type: str | None
    url: str  # after redirects


def is_public(ip: IPAddress) -> bool:
    """True only for globally routable unicast addresses."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None:
            return False  # an IPv4 address in IPv6 clothing: refuse rather than reason about it
    if any(ip in net for net in _BLOCKED if net.version == ip.version):
        return False
    return ip.is_global and not ip.is_multicast


async def system_resolver(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def fetch(
    url: str,
    *,
    max_bytes: int,
    timeout_s: float,
    max_redirects: int = 3,
    resolver: Resolver = system_resolver,
    is_allowed: Callable[[IPAddress], bool] = is_public,
    param: str | None = None,
) -> Fetched:
    """GET `url` under the rules above. Raises UnsafeURL, FetchError, InputTooLong (over max_bytes)."""
    try:
        with anyio.fail_after(timeout_s):
            async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=timeout_s) as client:
                for _ in range(max_redirects + 1):
                    response = await _get(client, url, max_bytes, resolver, is_allowed, param)
                    if isinstance(response, Fetched):
                        return response
                    url = response  # a redirect: check the next hop like the first
    except TimeoutError:
        raise FetchError(f"Fetching the URL took over {timeout_s:.0f} s.", param=param) from None
    except httpx.HTTPError as e:
        raise FetchError(f"Could not fetch the URL ({type(e).__name__}).", param=param) from None
    raise FetchError(f"The URL redirected more than {max_redirects} times.", param=param)


async def _get(client: httpx.AsyncClient, url: str, max_bytes: int, resolver: Resolver,
               is_allowed: Callable[[IPAddress], bool], param: str | None) -> Fetched | str:
    """One hop: a Fetched, or the (absolute) URL it redirects to."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeURL("Only http:// and https:// URLs with a host name are fetched.", param=param)
    if parts.username or parts.password:
        raise UnsafeURL("URLs with credentials are not fetched.", param=param)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    ip = await _checked_address(parts.hostname, port, resolver, is_allowed, param)
    target = httpx.URL(url).copy_with(host=str(ip))  # connect to the address checked, nothing else
    host_header = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    # identity: the byte cap counts what we keep (no decompression bombs).
    headers = {"Host": host_header, "Accept-Encoding": "identity"}
    request = client.build_request("GET", target, headers=headers, extensions=extensions)
    response = await client.send(request, stream=True)
    try:
        if response.status_code in REDIRECTS and "location" in response.headers:
            return urljoin(url, response.headers["location"])
        if response.status_code != 200:
            raise FetchError(f"The URL answered HTTP {response.status_code}.", param=param)
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise InputTooLong(f"The URL's content is larger than {max_bytes} bytes.", param=param)
        body = bytearray()
        async for piece in response.aiter_raw():
            body += piece
            if len(body) > max_bytes:
                raise InputTooLong(f"The URL's content is larger than {max_bytes} bytes.", param=param)
        return Fetched(bytes(body), response.headers.get("content-type"), url)
    finally:
        await response.aclose()


async def _checked_address(host: str, port: int, resolver: Resolver, is_allowed: Callable[[IPAddress], bool],
                           param: str | None) -> IPAddress:
    try:
        literal: IPAddress | None = ipaddress.ip_address(host)
    except ValueError:
        literal = None
    if literal is not None:
        addresses = [literal]
    else:
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in await resolver(host, port)]
        except (OSError, ValueError):
            raise FetchError(f"The host '{host}' could not be resolved.", param=param) from None
    # Every address must pass: a name that resolves to one public and one private address is refused.
    if not addresses or not all(is_allowed(a) for a in addresses):
        raise UnsafeURL(f"The host '{host}' is not a public internet address; it is not fetched.", param=param)
    return addresses[0]

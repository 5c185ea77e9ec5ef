"""Outbound requests to addresses users give (audio_url, webhook_url), under net/fetch.py's rules.

`address_policy` is net/fetch.py's public-only rule plus the networks an operator allowed
(CSM_FETCH_ALLOW_NETWORKS). `post_json` is the webhook's POST with the same protections as
fetch: one lookup, every address checked, the connection pinned to the checked address, no
redirects followed, time capped, no proxies from the environment.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import httpx

from csm_voice_api.net.fetch import FetchError, IPAddress, Resolver, UnsafeURL, is_public, system_resolver

AddressPolicy = Callable[[IPAddress], bool]


def address_policy(allowed: Sequence[str]) -> AddressPolicy:
    """Public addresses, plus any in `allowed` (addresses or networks, e.g. "127.0.0.1", "10.0.0.0/8")."""
    try:
        nets = [ipaddress.ip_network(a, strict=False) for a in allowed]
    except ValueError as e:
        raise ValueError(f"CSM_FETCH_ALLOW_NETWORKS: {e}") from None

    def allow(ip: IPAddress) -> bool:
        return is_public(ip) or any(ip in n for n in nets if n.version == ip.version)

    return allow


async def checked_target(url: str, allow: AddressPolicy, resolver: Resolver = system_resolver,
                         param: str | None = None) -> tuple[httpx.URL, str]:  # fmt: skip
    """The URL rewritten to the checked address, and the Host header; UnsafeURL when refused."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeURL("Only http:// and https:// URLs with a host name are used.", param=param)
    if parts.username or parts.password:
        raise UnsafeURL("URLs with credentials are not used.", param=param)
    host = parts.hostname
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in await resolver(host, port)]
        except (OSError, ValueError):
            raise FetchError(f"The host '{host}' could not be resolved.", param=param) from None
    if not addresses or not all(allow(a) for a in addresses):
        raise UnsafeURL(f"The host '{host}' is not a public internet address; it is not contacted.", param=param)
    target = httpx.URL(url).copy_with(host=str(addresses[0]))
    return target, host if parts.port is None else f"{host}:{parts.port}"


async def post_json(url: str, payload: dict, *, headers: dict[str, str], allow: AddressPolicy, timeout_s: float,
                    resolver: Resolver = system_resolver) -> int:  # fmt: skip
    """POST `payload` as JSON; returns the status code (a redirect is an answer, not followed)."""
    target, host = await checked_target(url, allow, resolver)
    extensions = {"sni_hostname": urlsplit(url).hostname} if target.scheme == "https" else {}
    body = json.dumps(payload, separators=(",", ":")).encode()
    all_headers = {**headers, "Host": host, "Content-Type": "application/json"}
    async with httpx.AsyncClient(trust_env=False, follow_redirects=False, timeout=timeout_s) as client:
        request = client.build_request("POST", target, content=body, headers=all_headers, extensions=extensions)
        response = await client.send(request)
        return response.status_code

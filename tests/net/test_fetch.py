"""Remote URL fetching: stubbed DNS, a local origin and a sentinel server that must receive nothing."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from csm_voice_api.errors import InputTooLong
from csm_voice_api.net.fetch import FetchError, UnsafeURL, fetch, is_public, system_resolver

ORIGIN_IP = "127.0.0.1"  # the one address these tests treat as public
SENTINEL_IP = "127.0.0.2"  # loopback too: anything that reaches it is a failure


@dataclass
class Server:
    port: int
    connections: int = 0
    hosts: list[str] = field(default_factory=list)


async def _handle(server: Server, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    server.connections += 1
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    path = head.split(" ")[1]
    server.hosts += [line[6:] for line in head.split("\r\n") if line.lower().startswith("host: ")]
    if path == "/ok":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: audio/wav\r\nContent-Length: 5\r\n\r\nRIFF!")
    elif path == "/big":  # no Content-Length: counted as it arrives
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"x" * 100_000)
    elif path == "/declared":
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999\r\n\r\nxx")
    elif path == "/slow":
        await asyncio.sleep(30)
    elif path.startswith("/redirect/"):
        location = path[len("/redirect/"):].replace("%3A", ":").replace("|", "/")
        writer.write(f"HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n".encode())
    elif path == "/loop":
        writer.write(b"HTTP/1.1 302 Found\r\nLocation: /loop\r\nContent-Length: 0\r\n\r\n")
    else:
        writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
    await writer.drain()
    writer.close()


async def _start(ip: str) -> tuple[Server, asyncio.AbstractServer]:
    server = Server(0)
    srv = await asyncio.start_server(lambda r, w: _handle(server, r, w), ip, 0)
    server.port = srv.sockets[0].getsockname()[1]
    return server, srv


@pytest.fixture
async def origin() -> AsyncIterator[Server]:
    server, srv = await _start(ORIGIN_IP)
    yield server
    srv.close()


@pytest.fixture
async def sentinel() -> AsyncIterator[Server]:
    server, srv = await _start(SENTINEL_IP)
    yield server
    srv.close()
    assert server.connections == 0, "the sentinel was reached"


DNS = {"audio.example": [ORIGIN_IP], "internal.example": [SENTINEL_IP], "metadata.example": ["169.254.169.254"],
       "mixed.example": [ORIGIN_IP, SENTINEL_IP], "v6.example": ["::ffff:127.0.0.2"]}


async def stub_dns(host: str, port: int) -> list[str]:
    if host not in DNS:
        raise OSError("no such host")
    return DNS[host]


def only_origin(ip) -> bool:
    return str(ip) == ORIGIN_IP


async def get(url: str, **kw):
    return await fetch(url, max_bytes=kw.pop("max_bytes", 10_000), timeout_s=kw.pop("timeout_s", 5.0),
                       resolver=stub_dns, is_allowed=only_origin, **kw)


async def test_fetches_through_the_checked_address_with_the_original_host(origin, sentinel):
    got = await get(f"http://audio.example:{origin.port}/ok")
    assert got.content == b"RIFF!" and got.content_type == "audio/wav"
    assert origin.hosts == [f"audio.example:{origin.port}"]


@pytest.mark.parametrize("url", [
    "ftp://audio.example/x", "file:///etc/passwd", "gopher://audio.example/", "http:///nohost",
    "http://user:pw@audio.example:{o}/ok",
    "http://internal.example:{s}/", "http://mixed.example:{s}/", "http://metadata.example/latest/",
    "http://v6.example:{s}/", "http://127.0.0.2:{s}/", "http://[::ffff:127.0.0.2]:{s}/",
])  # fmt: skip
async def test_refuses_schemes_and_non_public_addresses_without_connecting(url, origin, sentinel):
    with pytest.raises(UnsafeURL):
        await get(url.format(o=origin.port, s=sentinel.port))
    assert origin.connections == 0


async def test_redirects_are_checked_hop_by_hop(origin, sentinel):
    for to in (f"http%3A||internal.example%3A{sentinel.port}|", f"http%3A||127.0.0.2%3A{sentinel.port}|",
               "http%3A||169.254.169.254|latest", "file%3A|||etc|passwd"):
        with pytest.raises(UnsafeURL):
            await get(f"http://audio.example:{origin.port}/redirect/{to}")
    got = await get(f"http://audio.example:{origin.port}/redirect/|ok")  # a safe redirect is followed
    assert got.content == b"RIFF!" and got.url.endswith("/ok")
    with pytest.raises(FetchError, match="redirected more than 3"):
        await get(f"http://audio.example:{origin.port}/loop")


async def test_byte_and_time_caps(origin, sentinel):
    with pytest.raises(InputTooLong):
        await get(f"http://audio.example:{origin.port}/big", max_bytes=50_000)
    with pytest.raises(InputTooLong):
        await get(f"http://audio.example:{origin.port}/declared")
    with pytest.raises(FetchError, match="took over"):
        await get(f"http://audio.example:{origin.port}/slow", timeout_s=0.5)
    with pytest.raises(FetchError, match="could not be resolved"):
        await get("http://unknown.example/")
    with pytest.raises(FetchError, match="404"):
        await get(f"http://audio.example:{origin.port}/missing")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.1", "2130706433", "0x7f000001", "0.0.0.0", "10.1.2.3",
                                  "100.64.0.1", "169.254.169.254", "192.168.0.1", "[::1]", "[fe80::1]",
                                  "[fd00:ec2::254]", "[::ffff:10.0.0.1]", "[64:ff9b::a00:1]", "[2002:a00:1::1]"])
async def test_the_real_policy_refuses_internal_addresses(host, sentinel):
    # The system resolver only parses these numeric forms: no lookup leaves the machine.
    with pytest.raises(UnsafeURL):
        await fetch(f"http://{host}:{sentinel.port}/", max_bytes=100, timeout_s=5, resolver=system_resolver)


def test_is_public():
    for ok in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"):
        assert is_public(ipaddress.ip_address(ok)), ok
    for bad in ("127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "100.100.100.200", "169.254.169.254",
                "0.0.0.0", "224.0.0.1", "255.255.255.255", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
                "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1", "2001:0:4136:e378:8000:63bf:3fff:fdd2"):
        assert not is_public(ipaddress.ip_address(bad)), bad

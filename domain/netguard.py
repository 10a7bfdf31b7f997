"""Requests to addresses a caller gave us go only to the public internet.

A caller's URL is untrusted: unless allowed (WEBHOOK_ALLOW_PRIVATE=1), the service never sends to an
address inside (loopback, private, link-local, multicast, reserved, their IPv6 forms and IPv4-mapped
ones). `check_target` refuses such a URL when it arrives; `public_session` checks the address each
connection actually reached, so a name that later resolves inside is refused too. No redirects are
followed by the callers of this module. `read_bounded` reads what came back within a size and a deadline.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from errors import InvalidRequest


class RefusedTarget(InvalidRequest):
    """A callback_url the service will not post to."""


class BodyRefused(Exception):
    """A body larger than allowed, or too slow to arrive."""


# IPv6 addresses that carry an IPv4 address in their last 32 bits (NAT64, and SIIT's IPv4-translated form)
EMBEDDING_IPV4 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("::ffff:0:0:0/96"))
# Deprecated or local-only ranges that `is_global` lets through: IPv4-compatible, site-local, local-use NAT64
NEVER_PUBLIC = (
    ipaddress.ip_network("::/96"),
    ipaddress.ip_network("fec0::/10"),
    ipaddress.ip_network("64:ff9b:1::/48"),
)


def check_target(url: str, allow_private: bool, name: str = "callback_url") -> None:
    """Refuse a URL (`name` says which, in the message) that is not http(s), cannot be found, or (unless
    allowed) points inside."""
    try:
        parts = urlsplit(url)
        readable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # an unclosed [ of an IPv6 host, say
        readable = False
    if not readable:
        raise RefusedTarget(f"{name} must be a web address that starts with https:// (or http://).")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)}
    except (OSError, ValueError):
        raise RefusedTarget(f"{name}'s host {parts.hostname!r} cannot be found; please check it.") from None
    if not allow_private and any(inside(address) for address in addresses):
        raise RefusedTarget(
            f"{name} points at a private or local address, and the service reaches only public ones. "
            "For a receiver on the same machine or network, the service's owner can set WEBHOOK_ALLOW_PRIVATE=1."
        )


def inside(address: str) -> bool:
    """Loopback, private, link-local, multicast, reserved or otherwise not a public internet address; an IPv6
    address is inside, too, when the IPv4 address it carries (mapped, compatible, NAT64, 6to4, SIIT) is."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        carried = _carried_ipv4(ip)
        if carried is not None and inside(str(carried)):
            return True
        if any(ip in network for network in NEVER_PUBLIC):
            return True
        if ip.ipv4_mapped is not None:
            return False  # a public IPv4 address, mapped: as public as it is
    return not ip.is_global or ip.is_multicast


def _carried_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if any(ip in network for network in (*EMBEDDING_IPV4, NEVER_PUBLIC[0])):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def origin(url: str) -> str:
    """scheme://host:port of a URL, as a prefix requests can mount an adapter on."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}".lower()


def plain_session() -> requests.Session:
    """A session that takes nothing from the environment: proxy variables and ~/.netrc are looked up on every
    call otherwise, and the service's outbound calls go straight to their targets."""
    session = requests.Session()
    session.trust_env = False
    return session


def public_session(allow_private: bool, trusted: tuple[str, ...] = ()) -> requests.Session:
    """A session whose connections are refused, right after connecting, when they reached an address inside;
    except to the `trusted` origins (the upstream's own, which is on this machine in demo mode)."""
    session = plain_session()
    adapter = HTTPAdapter() if allow_private else PublicOnlyAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    for trusted_origin in trusted:
        session.mount(trusted_origin + "/", HTTPAdapter())
    return session


def read_bounded(answer: requests.Response, max_bytes: int, seconds: float) -> Iterator[bytes]:
    """The body of a streamed answer as it arrives: at most `max_bytes`, all of it within `seconds`."""
    deadline = time.monotonic() + seconds
    size = 0
    # read1: whatever has arrived, so that a body sent a byte at a time meets the deadline too
    while chunk := answer.raw.read1(64 * 1024, decode_content=True):
        size += len(chunk)
        if size > max_bytes:
            raise BodyRefused(f"larger than {max_bytes // 2**20} MB")
        if time.monotonic() > deadline:
            raise BodyRefused(f"not fetched within {seconds:g} s")
        yield chunk


class _PublicPeersOnly:
    """Checks the address a connection actually reached, right after connecting (before TLS, before a byte)."""

    def _new_conn(self):
        sock = super()._new_conn()
        if inside(sock.getpeername()[0]):
            sock.close()
            raise RefusedTarget("the address now leads to a private or local one; it was not called.")
        return sock


class _PublicHTTPConnection(_PublicPeersOnly, HTTPConnection):
    pass


class _PublicHTTPSConnection(_PublicPeersOnly, HTTPSConnection):
    pass


class _PublicHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _PublicHTTPConnection


class _PublicHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _PublicHTTPSConnection


class PublicOnlyAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs):
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _PublicHTTPConnectionPool,
            "https": _PublicHTTPSConnectionPool,
        }

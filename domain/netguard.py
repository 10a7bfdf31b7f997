"""Requests to addresses a caller gave us go only to the public internet.

A caller's URL is untrusted: unless allowed (WEBHOOK_ALLOW_PRIVATE=1), the service never sends to an
address inside (loopback, private, link-local, multicast, reserved, their IPv6 forms and IPv4-mapped
ones). `check_target` refuses such a URL when it arrives; `public_session` checks the address each
connection actually reached, so a name that later resolves inside is refused too. No redirects are
followed by the callers of this module.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from errors import InvalidRequest


class RefusedTarget(InvalidRequest):
    """A callback_url the service will not post to."""


def check_target(url: str, allow_private: bool) -> None:
    """Refuse a callback_url that is not http(s), cannot be found, or (unless allowed) points inside."""
    try:
        parts = urlsplit(url)
        readable = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # an unclosed [ of an IPv6 host, say
        readable = False
    if not readable:
        raise RefusedTarget("callback_url must be a web address that starts with https:// (or http://).")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = {info[4][0] for info in socket.getaddrinfo(parts.hostname, port, type=socket.SOCK_STREAM)}
    except (OSError, ValueError):
        raise RefusedTarget(f"callback_url's host {parts.hostname!r} cannot be found; please check it.") from None
    if not allow_private and any(inside(address) for address in addresses):
        raise RefusedTarget(
            "callback_url points at a private or local address, and webhooks go only to public ones. "
            "For a receiver on the same machine or network, the service's owner can set WEBHOOK_ALLOW_PRIVATE=1."
        )


def inside(address: str) -> bool:
    """Loopback, private, link-local, multicast, reserved or otherwise not a public internet address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


def plain_session() -> requests.Session:
    """A session that takes nothing from the environment: proxy variables and ~/.netrc are looked up on every
    call otherwise, and the service's outbound calls go straight to their targets."""
    session = requests.Session()
    session.trust_env = False
    return session


def public_session(allow_private: bool) -> requests.Session:
    """A session whose connections are refused, right after connecting, when they reached an address inside."""
    session = plain_session()
    adapter = HTTPAdapter() if allow_private else PublicOnlyAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


class _PublicPeersOnly:
    """Checks the address a connection actually reached, right after connecting (before TLS, before a byte)."""

    def _new_conn(self):
        sock = super()._new_conn()
        if inside(sock.getpeername()[0]):
            sock.close()
            raise RefusedTarget("callback_url now leads to a private or local address; it was not called.")
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

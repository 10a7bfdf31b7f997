"""Helpers the tests share beyond tools/processes.py: the served emulator and a service's environment."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import requests
from flask import Flask

from tools.emulator import Upstream, create_emulator
from tools.processes import serving

SERVED_KEY = "served-key"  # the one key of `served_upstream` (conftest)


@contextmanager
def emulated_upstream(**options) -> Iterator[Upstream]:
    """The emulator served on a free port; yields its state, with `url` set to where it listens."""
    state = Upstream(**options)
    with serving(create_emulator(state)) as url:
        state.url = url
        yield state


def served_environ(upstream: Upstream, **extra: str) -> dict[str, str]:
    """A service's environment with the emulator `upstream`: its key, quick polls, no rate limit, no pacing of the
    upstream (the emulator has no limits unless a test gives it some), and `extra`."""
    return {
        "API_KEYS_1": SERVED_KEY,
        "NANOBANANA_API_BASE": upstream.url,
        "POLL_INTERVAL": "0.1",
        "RATE_LIMIT": "off",
        "UPSTREAM_RATE": "off",
        "UPSTREAM_MAX_RUNNING": "off",
        **extra,
    }


@dataclass
class Served:
    """An app served in this process (conftest's `serve_app`), reached over real HTTP like a Service."""

    app: Flask
    url: str

    def get(self, path: str, **kwargs) -> requests.Response:
        return requests.get(self.url + path, timeout=30, **kwargs)


def store_environ(store: str, request, tmp_path) -> dict[str, str]:
    """The settings naming a fresh store of that kind (its real server started once per run)."""
    if store == "redis":
        return {"REDIS_URL": request.getfixturevalue("redis_server").url}
    if store == "postgres":
        server = request.getfixturevalue("postgres_server")
        server.reset()
        return {"DATABASE_URL": server.url}
    return {"DATABASE_PATH": str(tmp_path / "db.sqlite3")}


def png(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    """A real PNG of one colour, as a browser or the upstream would read it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + bytes(rgb) * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")

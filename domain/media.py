"""Lasting copies of finished pictures (CONTRACT §9): the upstream keeps its files only about 14 days.

MEDIA_STORE=local keeps them under MEDIA_DIR, served at /media/<name>; MEDIA_STORE=s3://bucket/prefix
keeps them in any S3-compatible store (boto3; S3_ENDPOINT_URL for one that is not AWS). A picture is
fetched streamed, at most 30 MB, images only, with a time-out, and kept under a name nobody can guess.
It is fetched only from the public internet (or the upstream's own address): a result address, or a
redirect, that leads inside is refused like a webhook's (domain/netguard.py), at each hop and at connect.
A copy that fails leaves the upstream's address in place (the caller still gets a picture), and says so
in the log.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import tempfile
from typing import IO
from urllib.parse import urljoin

import requests

from config import Settings
from domain.netguard import BodyRefused, RefusedTarget, check_target, origin, public_session, read_bounded

log = logging.getLogger(__name__)

MAX_BYTES = 30 * 1024 * 1024
FETCH_TIMEOUT = (5.0, 15.0)  # connect, and each read
FETCH_DEADLINE = 60.0  # for the whole picture
MAX_REDIRECTS = 3
SIGNATURES = {"image/png": b"\x89PNG\r\n\x1a\n", "image/jpeg": b"\xff\xd8\xff", "image/gif": b"GIF8"}
UPLOAD_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif")  # what people may upload
MAX_AGE = 365 * 24 * 3600  # a copy may be cached for a year: a name is never reused for another picture
CACHE_CONTROL = f"public, max-age={MAX_AGE}, immutable"
EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/avif": ".avif",
    "image/svg+xml": ".svg",
}
NAME = re.compile(r"[A-Za-z0-9_-]{32}\.(png|jpg|webp|gif|avif|svg)")


class NotKept(Exception):
    """The picture could not be copied: not an image, too large, too slow, or not there."""


class Media:
    """Where lasting copies live; subclasses say how to put, name and remove one."""

    reachable = True  # the copies' addresses can be fetched from outside, so the upstream can edit them

    def __init__(self, session: requests.Session | None = None, upstream: str | None = None):
        """`upstream`: the upstream's base address; pictures there may be fetched wherever it is (demo mode)."""
        self.trusted = (origin(upstream),) if upstream else ()
        self.session = session or public_session(allow_private=False, trusted=self.trusted)

    def keep(self, url: str) -> str | None:
        """The address of a lasting copy of the picture at `url`; None if none could be made."""
        with tempfile.SpooledTemporaryFile(max_size=1024 * 1024) as content:
            try:
                content_type = self._fetch(url, content)
            except (NotKept, RefusedTarget, requests.RequestException, OSError) as failure:
                log.warning("no lasting copy of a picture (the upstream's address stays): %s", failure)
                return None
            content.seek(0)
            return self.keep_file(content, content_type)

    def keep_file(self, content: IO[bytes], content_type: str) -> str | None:
        """The address of a lasting copy of a picture at hand; None if it is no picture or could not be kept."""
        if content_type not in EXTENSIONS or not looks_like(content, content_type):
            return None
        try:
            return self._put(secrets.token_urlsafe(24) + EXTENSIONS[content_type], content, content_type)
        except Exception:  # the store refused it (S3 credentials, a missing bucket): the owner must hear of it
            log.exception("no lasting copy of a picture")
            return None

    def owns(self, url: str) -> bool:
        """Whether `url` is the address of a picture kept here."""
        return self._name_of(url) is not None

    def delete(self, urls: list[str]) -> None:
        """Remove the copies among `urls` (others are not ours, and stay)."""
        for url in urls:
            name = self._name_of(url)
            if name is not None:
                try:
                    self._remove(name)
                except Exception:
                    log.exception("could not remove a copy")

    def _fetch(self, url: str, into: IO[bytes]) -> str:
        """Fetch the picture into `into`, following redirects only to where a picture may be fetched from."""
        for _ in range(MAX_REDIRECTS + 1):
            if origin(url) not in self.trusted:
                check_target(url, allow_private=False, name="the picture's address")
            with self.session.get(url, stream=True, timeout=FETCH_TIMEOUT, allow_redirects=False) as answer:
                if not answer.is_redirect:
                    return self._read(answer, into)
                url = urljoin(url, answer.headers["Location"])
        raise NotKept(f"more than {MAX_REDIRECTS} redirects")

    def _read(self, answer: requests.Response, into: IO[bytes]) -> str:
        """The picture's bytes into `into`, if it is a picture of at most 30 MB; its content type."""
        if answer.status_code != 200:
            raise NotKept(f"the picture's address answered HTTP {answer.status_code}")
        content_type = answer.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type not in EXTENSIONS:
            raise NotKept(f"not a picture ({content_type or 'no content type'})")
        if int(answer.headers.get("Content-Length") or 0) > MAX_BYTES:
            raise NotKept("larger than 30 MB")
        try:
            for chunk in read_bounded(answer, MAX_BYTES, FETCH_DEADLINE):
                into.write(chunk)
        except BodyRefused as refused:
            raise NotKept(str(refused)) from None
        return content_type

    def path(self, name: str) -> str | None:
        """The file of a copy this service serves itself (at /media/<name>), if `name` is one."""
        return None

    def _put(self, name: str, content: IO[bytes], content_type: str) -> str:
        raise NotImplementedError

    def _name_of(self, url: str) -> str | None:
        raise NotImplementedError

    def _remove(self, name: str) -> None:
        raise NotImplementedError


class LocalMedia(Media):
    """Files in a folder, served by the service itself at /media/<name>."""

    def __init__(
        self,
        folder: str,
        base_url: str,
        reachable: bool,
        session: requests.Session | None = None,
        upstream: str | None = None,
    ):
        super().__init__(session, upstream)
        self.folder = folder
        self.prefix = f"{base_url.rstrip('/')}/media/"
        self.reachable = reachable

    def path(self, name: str) -> str | None:
        """The file of a copy, if `name` is one of ours."""
        return os.path.join(self.folder, name) if NAME.fullmatch(name) else None

    def _put(self, name: str, content: IO[bytes], content_type: str) -> str:
        os.makedirs(self.folder, exist_ok=True)  # on the first write: a service that keeps nothing needs no folder
        partial = os.path.join(self.folder, f".{name}.partial")
        with open(partial, "wb") as file:
            while chunk := content.read(64 * 1024):
                file.write(chunk)
        os.replace(partial, os.path.join(self.folder, name))  # whole, or not at all
        return self.prefix + name

    def _name_of(self, url: str) -> str | None:
        name = url.removeprefix(self.prefix)
        return name if url.startswith(self.prefix) and NAME.fullmatch(name) else None

    def _remove(self, name: str) -> None:
        path = self.path(name)
        if path and os.path.exists(path):
            os.remove(path)


class S3Media(Media):
    """Objects in a bucket of any S3-compatible store, readable by their address (a public bucket policy)."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        endpoint_url: str | None,
        session: requests.Session | None = None,
        upstream: str | None = None,
    ):
        super().__init__(session, upstream)
        import boto3  # only when S3 is used: it takes a while to load

        self.bucket = bucket
        self.prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
        self.client = boto3.client("s3", endpoint_url=endpoint_url)
        base = f"{endpoint_url.rstrip('/')}/{bucket}" if endpoint_url else f"https://{bucket}.s3.amazonaws.com"
        self.url_prefix = f"{base}/{self.prefix}"

    def _put(self, name: str, content: IO[bytes], content_type: str) -> str:
        extra = {"ContentType": content_type, "CacheControl": CACHE_CONTROL}
        self.client.upload_fileobj(content, self.bucket, self.prefix + name, ExtraArgs=extra)
        return self.url_prefix + name

    def _name_of(self, url: str) -> str | None:
        name = url.removeprefix(self.url_prefix)
        return name if url.startswith(self.url_prefix) and NAME.fullmatch(name) else None

    def _remove(self, name: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.prefix + name)


def looks_like(content: IO[bytes], content_type: str) -> bool:
    """Whether the bytes begin as a picture of that type does (its signature): a content type alone is a claim."""
    start = content.read(1024)
    content.seek(0)
    if content_type == "image/svg+xml":
        return b"<svg" in start.lower()
    if content_type == "image/webp":
        return start[:4] == b"RIFF" and start[8:12] == b"WEBP"
    if content_type == "image/avif":
        return start[4:12] in (b"ftypavif", b"ftypavis")
    return start.startswith(SIGNATURES[content_type])


def upload_type(content: IO[bytes]) -> str | None:
    """The type of an uploaded picture, known by its bytes (a name or a content type is only a claim)."""
    return next((kind for kind in UPLOAD_TYPES if looks_like(content, kind)), None)


def local_media(settings: Settings, session: requests.Session | None = None) -> LocalMedia:
    """Files under MEDIA_DIR, at PUBLIC_BASE_URL/media/… (which the upstream can fetch), else on this machine."""
    base_url = settings.public_base_url or f"http://127.0.0.1:{settings.port}"
    reachable = settings.public_base_url is not None
    return LocalMedia(settings.media_dir, base_url, reachable, session, settings.api_base)


def open_media(settings: Settings, session: requests.Session | None = None) -> Media | None:
    """The media store MEDIA_STORE names, or None to keep the upstream's addresses."""
    if settings.media_store is None:
        return None
    if settings.media_store == "local":
        return local_media(settings, session)
    bucket, _, prefix = settings.media_store.removeprefix("s3://").partition("/")
    return S3Media(bucket, prefix, settings.s3_endpoint_url, session, settings.api_base)

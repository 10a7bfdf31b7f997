"""Pictures people upload to start from (CONTRACT §14): kept in the media store, at an address the upstream
can fetch, for as long as a conversation's pictures are kept after their last change (HISTORY_TTL).

An upload is known by its bytes (PNG, JPEG, WebP or GIF), never by its name or declared type. Each use
as `image_url` renews its time; one nobody uses in time is removed by the keeper's purge.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO

from background import Background
from domain.media import Media, upload_type
from errors import NotAPicture, StoreUnavailable, UploadsUnavailable
from stores.interface import Store

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Upload:
    url: str
    content_type: str
    size: int


class Uploads:
    def __init__(
        self,
        store: Store,
        media: Media,
        lifetime: float,
        background: Background | None = None,
        clock: Callable[[], float] = time.time,
    ):
        """`lifetime`: seconds an upload is kept after it was sent or last used. Removals go as `background` work
        when it is given (the keeper, which finds them, must not wait for a bucket)."""
        self.store = store
        self.media = media
        self.lifetime = lifetime
        self.background = background
        self.clock = clock

    def check_usable(self) -> None:
        """UploadsUnavailable when the upstream could not fetch what is kept here: said before a byte is read."""
        if not self.media.reachable:
            raise UploadsUnavailable()

    def take(self, content: IO[bytes], size: int) -> Upload:
        """Keep a picture; NotAPicture if it is none."""
        self.check_usable()
        content_type = upload_type(content)
        if content_type is None:
            raise NotAPicture()
        url = self.media.keep_file(content, content_type)
        if url is None:
            raise UploadsUnavailable("The picture could not be stored just now. Please try again in a minute.")
        try:
            self.store.keep_upload(url, self.clock() + self.lifetime)
        except StoreUnavailable:
            self.media.delete([url])  # unrecorded, it would never expire
            raise
        return Upload(url, content_type, size)

    def used(self, urls: Iterable[str]) -> None:
        """The uploads among `urls` start their time again: a picture being edited stays while it is needed."""
        until = self.clock() + self.lifetime
        for url in urls:
            if self.media.owns(url):
                self.store.renew_upload(url, until)

    def drop(self, urls: list[str]) -> None:
        """Remove uploads whose time ran out."""
        if self.background is None or not self.background.spawn(self._remove, urls):
            self._remove(urls)

    def _remove(self, urls: list[str]) -> None:
        self.media.delete(urls)
        log.info("removed %d upload(s) nobody used in time", len(urls))

"""Conversations: a person's chain of pictures (CONTRACT §9), kept in the store under a conversation key.

The one home of what a conversation means: which picture an edit starts from (explicit images, else
the picture of `from_task`, else the remembered one, else none), the chain, undo, and forget. The
routes, the lifecycle and the chat channels all come here; none of them reaches into the store's chain.
"""

from __future__ import annotations

from dataclasses import replace

from background import Background
from domain.media import Media
from domain.params import GenerationRequest
from errors import UnknownSourceTask
from nanobanana_client import Generation
from stores.interface import Store
from stores.records import CHANNEL_MARK, Picture, TaskState


def channel_owner(platform: str) -> str:
    """The owner of a chat platform's conversations and tasks."""
    return CHANNEL_MARK + platform


def conversation_key(owner: str, user_id: str | None) -> str | None:
    """Where a user's chain lives: the same user id of two owners (two access tokens, a chat) is two users."""
    if not user_id:
        return None
    return f"{owner}/{user_id}" if owner else user_id


class Conversations:
    def __init__(self, store: Store, media: Media | None = None, background: Background | None = None):
        """Copies that nobody waits for go as background work, when `background` is given."""
        self.store = store
        self.media = media  # where lasting copies of pictures live; None: the upstream's addresses
        self.background = background

    def chain(self, conversation: str) -> list[Picture]:
        """The pictures, oldest first; the last one is remembered."""
        return self.store.chain(conversation)

    def last(self, conversation: str) -> Picture | None:
        return self.store.last_picture(conversation)

    def undo(self, conversation: str) -> Picture | None:
        """Step back: the last picture leaves the chain (its copy stays, for from_task); None if there is none."""
        return self.store.undo(conversation)

    def forget(self, conversation: str, spare: tuple[str, ...] = (), wait: bool = True) -> None:
        """Start over: drop the chain, and the lasting copies of its pictures but those in `spare` (the picture a
        reset=1 request is about to edit). With `wait`, the copies are gone when this returns."""
        dropped = [picture for picture in self.store.forget(conversation) if picture.image_url not in spare]
        self.drop_copies(dropped, wait)

    def drop_copies(self, pictures: list[Picture], wait: bool = False) -> None:
        """Remove the lasting copies of pictures whose conversation was forgotten or expired (media must not grow
        forever), in the background unless asked to wait. An undone picture keeps its copy: from_task may still
        edit it."""
        if self.media is None or not pictures:
            return
        urls = [picture.image_url for picture in pictures]
        if wait or self.background is None:
            self.media.delete(urls)
        else:
            self.background.spawn(self.media.delete, urls)

    def source(self, wanted: GenerationRequest, conversation: str | None, owner: str) -> tuple[Generation, bool]:
        """What to send upstream, and whether it edits an earlier picture of this caller."""
        generation = wanted.generation
        if generation.image_urls:
            return generation, False
        if wanted.from_task:
            source = self._picture_of(wanted.from_task, owner)
        elif conversation and (last := self.last(conversation)) is not None:
            source = self._editable(last.image_url, last.upstream_image_url)
        else:
            return generation, False
        return replace(generation, image_urls=(source,)), True

    def _picture_of(self, task_id: str, owner: str) -> str:
        """The picture of an earlier task of this caller, to edit it."""
        record = self.store.task(task_id)
        if record is None or record.owner != owner or record.state != TaskState.SUCCESS:
            raise UnknownSourceTask()
        original = record.upstream_image_urls[0] if record.upstream_image_urls else None
        return self._editable(record.image_urls[0], original)

    def _editable(self, image_url: str, original: str | None) -> str:
        """The address to send the upstream for an edit: the lasting copy if the upstream can fetch it."""
        if self.media is None or self.media.reachable or original is None:
            return image_url
        return original

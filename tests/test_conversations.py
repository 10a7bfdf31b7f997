"""Conversations in process: which picture an edit starts from, and one forget that also removes lasting copies."""

from __future__ import annotations

from dataclasses import replace

import pytest

from domain.conversations import Conversations, conversation_key
from domain.params import GenerationRequest
from errors import UnknownSourceTask
from nanobanana_client import Generation
from stores.records import TaskRecord
from stores.sqlite import SqliteStore


class Copies:
    """A media store that records what it was asked to delete."""

    def __init__(self, reachable: bool = True):
        self.reachable = reachable
        self.deleted: list[str] = []

    def delete(self, urls: list[str]) -> None:
        self.deleted += urls


@pytest.fixture
def store():
    store = SqliteStore(":memory:", history_ttl=3600, max_users=10)
    yield store
    store.close()


def finished(store, task_id: str, owner: str, user_id: str, url: str, original: str | None = None) -> None:
    draft = TaskRecord(task_id, owner, conversation_key(owner, user_id), user_id, "text-to-image", (), False, 0.0)
    record, _ = store.record_task(draft)
    store.complete_task(
        replace(record, state="success", image_urls=(url,), upstream_image_urls=(original or url,), prompt="a cat")
    )


def asked(**choices) -> GenerationRequest:
    generation = Generation("make it blue", image_urls=choices.pop("image_urls", ()))
    return GenerationRequest(generation, user_id=choices.pop("user_id", None), reset=False, wait=0, **choices)


def test_the_same_user_id_of_two_owners_is_two_conversations():
    assert conversation_key("token-a", "alice") != conversation_key("token-b", "alice")
    assert conversation_key("", "alice") == "alice" and conversation_key("token-a", None) is None


def test_explicit_images_win_over_the_remembered_picture(store):
    finished(store, "t1", "", "alice", "https://copies.test/cat.png")
    generation, edits = Conversations(store).source(asked(image_urls=("https://x.test/mine.png",)), "alice", "")
    assert generation.image_urls == ("https://x.test/mine.png",) and not edits


def test_an_edit_starts_from_the_remembered_picture(store):
    finished(store, "t1", "", "alice", "https://copies.test/cat.png")
    generation, edits = Conversations(store).source(asked(user_id="alice"), "alice", "")
    assert generation.image_urls == ("https://copies.test/cat.png",) and edits


def test_an_upstream_that_cannot_reach_the_copy_gets_the_original(store):
    finished(store, "t1", "", "alice", "http://127.0.0.1:8000/media/x.png", original="https://upstream.test/x.png")
    conversations = Conversations(store, Copies(reachable=False))
    assert conversations.source(asked(user_id="alice"), "alice", "")[0].image_urls == ("https://upstream.test/x.png",)


def test_from_task_edits_that_picture_but_only_of_the_same_owner(store):
    finished(store, "t1", "mine", "alice", "https://copies.test/first.png")
    finished(store, "t2", "mine", "alice", "https://copies.test/second.png")
    conversations = Conversations(store)
    generation, _ = conversations.source(asked(from_task="t1"), "mine/alice", "mine")
    assert generation.image_urls == ("https://copies.test/first.png",)
    with pytest.raises(UnknownSourceTask):
        conversations.source(asked(from_task="t1"), "theirs/alice", "theirs")


def test_forget_drops_the_chain_and_its_lasting_copies(store):
    copies = Copies()
    conversations = Conversations(store, copies)
    finished(store, "t1", "", "alice", "https://copies.test/a.png")
    finished(store, "t2", "", "alice", "https://copies.test/b.png")
    finished(store, "t3", "", "bob", "https://copies.test/bob.png")
    conversations.forget("alice")
    assert conversations.chain("alice") == [] and conversations.last("bob") is not None
    assert copies.deleted == ["https://copies.test/a.png", "https://copies.test/b.png"]


def test_forget_spares_the_picture_a_reset_is_about_to_edit(store):
    copies = Copies()
    finished(store, "t1", "", "alice", "https://copies.test/a.png")
    finished(store, "t2", "", "alice", "https://copies.test/b.png")
    Conversations(store, copies).forget("alice", spare=("https://copies.test/a.png",))
    assert copies.deleted == ["https://copies.test/b.png"]

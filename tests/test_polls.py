"""The poll schedule: who is asked when (read on a fake clock), and that its one thread starts and stops."""

from __future__ import annotations

import threading
import time

import pytest

from background import Background
from domain.polls import MAX_PAUSE, PollSchedule
from tools.processes import wait_until


class Item:
    def __init__(self, name: str, over: bool = False):
        self.name, self.over = name, over


@pytest.fixture
def background():
    background = Background()
    yield background
    background.stop(timeout=2)


@pytest.fixture
def frozen(background) -> PollSchedule:
    """A schedule whose clock stands at 0, so its own thread never finds anything due: the test reads due()."""
    return PollSchedule(background, lambda item: None, lambda item: item.over, clock=lambda: 0.0)


def test_due_items_come_in_time_order_and_the_pause_is_until_the_next(frozen):
    for name, when in (("late", 20.0), ("early", 10.0), ("next", 25.0)):
        frozen.add(Item(name), when)
    due, pause = frozen.due(now=21.0)
    assert [item.name for item in due] == ["early", "late"] and pause == 4.0
    assert frozen.due(now=21.0) == ([], 4.0)


def test_items_that_are_over_are_dropped_not_asked(frozen):
    frozen.add(Item("ended by a callback", over=True), 1.0)
    frozen.add(Item("still pending"), 2.0)
    due, pause = frozen.due(now=5.0)
    assert [item.name for item in due] == ["still pending"] and pause == MAX_PAUSE


def test_items_due_at_the_same_time_keep_the_order_they_came_in(frozen):
    for name in ("first", "second", "third"):
        frozen.add(Item(name), 1.0)
    assert [item.name for item in frozen.due(now=1.0)[0]] == ["first", "second", "third"]


def test_added_items_are_asked_when_due_and_stop_ends_the_thread(background):
    asked: list[str] = []
    others = {thread for thread in threading.enumerate() if thread.name == "polls"}
    polls = PollSchedule(background, lambda item: asked.append(item.name), lambda item: item.over)
    polls.add(Item("now"), when=time.time())
    polls.add(Item("in a moment"), when=time.time() + 0.1)
    wait_until(lambda: asked == ["now", "in a moment"])
    polls.add(Item("in an hour"), when=time.time() + 3600)
    background.stop(timeout=2)
    assert {thread for thread in threading.enumerate() if thread.name == "polls"} <= others
    polls.add(Item("after stop"), when=0.0)
    assert len(polls) == 1 and asked == ["now", "in a moment"]

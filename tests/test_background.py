"""Background work has an owner: short work is counted and waited for, loops end when asked, failures are logged."""

from __future__ import annotations

import logging
import threading

from background import Background
from tools.processes import wait_until


def test_spawned_work_runs_and_stop_waits_for_it():
    background, release, done = Background(), threading.Event(), []

    def work(name: str) -> None:
        release.wait(2)
        done.append(name)

    background.spawn(work, "a picture")
    assert background.running == 1
    threading.Timer(0.1, release.set).start()
    background.stop(timeout=5)
    assert done == ["a picture"] and background.running == 0


def test_stop_gives_up_waiting_after_its_time_out():
    background, release = Background(), threading.Event()
    background.spawn(release.wait, 10)
    background.stop(timeout=0.1)
    assert background.running == 1 and background.stopping.is_set()
    release.set()
    wait_until(lambda: background.running == 0)


def test_a_loop_sleeping_on_its_own_event_is_woken_by_stop():
    background, woken, ended = Background(), threading.Event(), threading.Event()

    def loop() -> None:
        while not background.stopping.is_set():
            woken.wait(60)
        ended.set()

    background.loop("sleeper", loop, wake=woken.set)
    background.stop(timeout=2)
    assert ended.is_set()


def test_a_failure_in_background_work_is_logged_and_counted_out(caplog):
    background = Background()

    def broken() -> None:
        raise ValueError("a bug")

    with caplog.at_level(logging.ERROR, logger="background"):
        background.spawn(broken)
        wait_until(lambda: background.running == 0)
    assert "broken" in caplog.text and "a bug" in caplog.text

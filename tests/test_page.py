"""The web page in a real browser: Debian's Chromium, driven by Playwright, against the service and the emulator."""

from __future__ import annotations

import os
import shutil

import pytest

from tests.helpers import emulated_upstream
from tools.processes import Service

pytestmark = pytest.mark.slow

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "page-test-token"


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        message = "Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def upstream():
    with emulated_upstream(delay=0.3) as state:
        yield state


def start(upstream, log_path, **extra) -> Service:
    environ = {"API_KEYS_1": "page-key", "NANOBANANA_API_BASE": upstream.url, "POLL_INTERVAL": "0.1", **extra}
    return Service(environ, log_path).wait_ready()


@pytest.fixture(scope="module")
def service(upstream, tmp_path_factory):
    running = start(upstream, tmp_path_factory.mktemp("page") / "service.log")
    yield running
    running.stop()


@pytest.fixture
def page(browser, service):
    context = browser.new_context()  # a fresh browser: its own localStorage, so its own conversation
    opened = context.new_page()
    opened.goto(service.url + "/")
    yield opened
    context.close()


def make(page, prompt: str, image_url: str = "") -> None:
    page.get_by_label("What should the picture show").fill(prompt)
    page.get_by_label("Start from an image").fill(image_url)
    page.get_by_role("button", name="Make it").click()


def sources_of_last_task(upstream) -> list[str]:
    last = max(upstream.tasks.values(), key=lambda task: task.created)
    return last.params.get("imageUrls", [])


def test_a_prompt_shows_a_picture_and_the_next_one_edits_it(page, upstream):
    make(page, "a cat in a hat")
    chain = page.locator("#chain li")
    expect(chain).to_have_count(1)
    first = page.locator("#result-image").get_attribute("src")
    assert "/files/" in first
    expect(page.locator("#result-caption")).to_have_text("a cat in a hat")

    page.get_by_label("What should the picture show").fill("make it blue")
    page.keyboard.press("Control+Enter")  # the keyboard works as well as the button
    expect(chain).to_have_count(2)
    assert sources_of_last_task(upstream) == [first]
    expect(page.locator("#chain figcaption")).to_have_text(["a cat in a hat", "make it blue"])
    expect(page.locator("#result-caption")).to_have_text("make it blue")


def test_elapsed_seconds_show_while_waiting(page):
    make(page, "[delay=2] a slow snail")
    expect(page.locator("#status")).to_contain_text("Making your picture… 1 s", timeout=5000)
    expect(page.locator("#chain li")).to_have_count(1, timeout=10000)
    expect(page.locator("#status")).to_contain_text("Done in")


def test_reload_continues_the_conversation(page, upstream):
    make(page, "a lighthouse")
    expect(page.locator("#chain li")).to_have_count(1)
    first = page.locator("#result-image").get_attribute("src")
    page.reload()
    expect(page.locator("#chain li")).to_have_count(1)
    make(page, "at night")
    expect(page.locator("#chain li")).to_have_count(2)
    assert sources_of_last_task(upstream) == [first]


def test_start_over_begins_a_new_chain(page, upstream):
    make(page, "a red boat")
    expect(page.locator("#chain li")).to_have_count(1)
    page.get_by_role("button", name="Start over").click()
    expect(page.locator("#chain li")).to_have_count(0)
    expect(page.get_by_text("No pictures yet.")).to_be_visible()
    make(page, "a green tree")
    expect(page.locator("#chain li")).to_have_count(1)
    assert sources_of_last_task(upstream) == []


def test_undo_and_edit_an_earlier_picture_then_reload(page, upstream, service):
    make(page, "a cat")
    expect(page.locator("#chain li")).to_have_count(1)
    first = page.locator("#result-image").get_attribute("src")
    for prompt, count in (("make it blue", 2), ("add a hat", 3)):
        make(page, prompt)
        expect(page.locator("#chain li")).to_have_count(count)

    page.get_by_role("button", name="Undo").click()
    expect(page.locator("#chain figcaption")).to_have_text(["a cat", "make it blue"])
    expect(page.locator("#result-caption")).to_have_text("make it blue")

    page.get_by_role("button", name="Edit picture 1: a cat").click()
    expect(page.locator("#editing")).to_contain_text("edits picture 1")
    make(page, "make it green")
    expect(page.locator("#chain figcaption")).to_have_text(["a cat", "make it blue", "make it green"])
    assert sources_of_last_task(upstream) == [first]
    expect(page.locator("#editing")).to_be_hidden()

    page.reload()  # the chain is the service's: a reload shows the same
    expect(page.locator("#chain figcaption")).to_have_text(["a cat", "make it blue", "make it green"])
    second_tab = page.context.new_page()
    second_tab.goto(service.url + "/")
    expect(second_tab.locator("#chain figcaption")).to_have_text(["a cat", "make it blue", "make it green"])


def test_an_explicit_image_is_edited(page, upstream):
    make(page, "add a moustache", image_url="https://example.com/portrait.png")
    expect(page.locator("#chain li")).to_have_count(1)
    assert sources_of_last_task(upstream) == ["https://example.com/portrait.png"]


@pytest.mark.parametrize(
    "prompt, image_url, message",
    [
        ("a cat", "not a web address", "image_url 'not a web address' has a space in it"),
        ("a cat", "ftp://x.test/a.png", "image_url 'ftp://x.test/a.png' is not a web address"),
        ("[fail] a cat", "", "The image could not be made"),
        ("", "", "Please write what the picture should show."),
    ],
)
def test_errors_show_the_plain_message(page, prompt, image_url, message):
    make(page, prompt, image_url)
    expect(page.get_by_role("alert")).to_contain_text(message)
    expect(page.locator("#chain li")).to_have_count(0)


def test_works_with_an_access_token(browser, upstream, tmp_path):
    guarded = start(upstream, tmp_path / "guarded.log", ACCESS_TOKENS=TOKEN)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(guarded.url + "/")
        make(page, "a cat")
        expect(page.get_by_role("alert")).to_contain_text("needs an access token")
        page.get_by_label("Access token").fill(TOKEN)
        page.get_by_label("Access token").dispatch_event("change")
        make(page, "a cat")
        expect(page.locator("#chain li")).to_have_count(1)
        page.reload()
        expect(page.get_by_label("Access token")).to_have_value(TOKEN)
    finally:
        context.close()
        guarded.stop()


def test_page_is_readable_on_a_phone(browser, service):
    context = browser.new_context(viewport={"width": 375, "height": 740}, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(service.url + "/")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375  # nothing sticks out sideways
        expect(page.get_by_role("button", name="Make it")).to_be_visible()
    finally:
        context.close()


def test_a_picture_in_line_shows_its_place_and_can_be_cancelled(browser, upstream, tmp_path):
    paced = start(upstream, tmp_path / "paced.log", UPSTREAM_RATE="1/60s")
    context = browser.new_context()
    try:
        paced.get("/nanobanana", params={"prompt": "goes first"})
        ahead = [
            paced.get("/nanobanana", params={"prompt": f"ahead {n}", "user_id": f"someone-{n}", "wait": "0"}).json()
            for n in range(2)
        ]
        assert [body["queue_position"] for body in ahead] == [1, 2]
        page = context.new_page()
        page.goto(paced.url + "/")
        make(page, "a picture that waits")
        expect(page.locator("#status")).to_have_text("3rd in line for the image service…")
        page.get_by_role("button", name="Cancel this picture").click()
        expect(page.locator("#status")).to_have_text("Cancelled. Nothing was charged.", timeout=10000)
        expect(page.get_by_role("button", name="Cancel this picture")).to_be_hidden()
        assert not [task for task in upstream.tasks.values() if task.params["prompt"] == "a picture that waits"]
    finally:
        context.close()
        paced.stop()

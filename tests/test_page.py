"""The web page in a real browser: Debian's Chromium, driven by Playwright, against the service and the emulator."""

from __future__ import annotations

import os
import shutil

import pytest
import requests

from tests.helpers import emulated_upstream, png
from tools.processes import Service, free_port

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
    """The service as a deployment runs it for the page: a public address (so the upstream can fetch uploads, and
    calls back), and lasting copies in a local folder (so pictures download from the page's own origin)."""
    port = free_port()
    environ = {
        "API_KEYS_1": "page-key",
        "NANOBANANA_API_BASE": upstream.url,
        "POLL_INTERVAL": "0.1",
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "MEDIA_STORE": "local",
        "MEDIA_DIR": str(log_path.parent / f"media-{port}"),
        **extra,
    }
    return Service(environ, log_path, port=port).wait_ready()


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
    page.get_by_label("Or the web address of a picture").fill(image_url)
    page.get_by_role("button", name="Make it").click()


def sources_of_last_task(upstream) -> list[str]:
    last = max(upstream.tasks.values(), key=lambda task: task.created)
    return last.params.get("imageUrls", [])


def test_a_prompt_shows_a_picture_and_the_next_one_edits_it(page, upstream, service):
    make(page, "a cat in a hat")
    chain = page.locator("#chain li")
    expect(chain).to_have_count(1)
    first = page.locator("#result-image").get_attribute("src")
    assert first.startswith(service.url + "/media/")
    expect(page.locator("#result-caption")).to_have_text("a cat in a hat")

    page.get_by_label("What should the picture show").fill("make it blue")
    page.keyboard.press("Control+Enter")  # the keyboard works as well as the button
    expect(chain).to_have_count(2)
    assert sources_of_last_task(upstream) == [first]
    expect(page.locator("#chain figcaption")).to_have_text(["a cat in a hat", "make it blue"])
    expect(page.locator("#result-caption")).to_have_text("make it blue")


def test_elapsed_seconds_show_while_waiting(page):
    make(page, "[delay=2] a slow snail")
    expect(page.locator("#status")).to_have_text("Making your picture…", timeout=5000)
    expect(page.locator("#clock")).to_have_text("1 s", timeout=5000)  # shown, and not read out every second
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


# -- a photo from the device, the model's choices, downloads, a phone, the keyboard, accessibility ---------------


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "my photo.png"
    path.write_bytes(png(24, 16, (20, 120, 200)))
    return path


def chosen_photo(page) -> str:
    """The address of the photo shown as the starting picture, once it is shown."""
    expect(page.locator("#chosen")).to_be_visible()
    return page.locator("#chosen-image").get_attribute("src")


def test_a_photo_from_disk_is_uploaded_shown_and_edited(page, upstream, service, photo):
    page.get_by_label("Choose a photo from your device").set_input_files(photo)
    url = chosen_photo(page)
    assert url.startswith(service.url + "/media/")
    assert requests.get(url, timeout=5).content == photo.read_bytes()  # what the upstream will fetch
    expect(page.locator("#status")).to_contain_text("Your photo is ready")
    page.get_by_label("What should the picture show").fill("make the sky orange")
    page.get_by_role("button", name="Make it").click()
    expect(page.locator("#chain li")).to_have_count(1)
    assert sources_of_last_task(upstream) == [url]
    expect(page.locator("#chosen")).to_be_hidden()  # the next prompt edits the new picture, not the photo
    make(page, "add a bird")
    expect(page.locator("#chain li")).to_have_count(2)
    assert sources_of_last_task(upstream) == [page.locator("#chain img").first.get_attribute("src")]


PASTE_OR_DROP = """([kind, bytes]) => {
  const file = new File([new Uint8Array(bytes)], "from-the-clipboard.png", {type: "image/png"});
  const data = new DataTransfer();
  data.items.add(file);
  if (kind === "paste") {
    document.getElementById("prompt").dispatchEvent(new ClipboardEvent("paste", {clipboardData: data, bubbles: true}));
  } else {
    const drop = new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true});
    document.getElementById("drop-zone").dispatchEvent(drop);
  }
}"""


@pytest.mark.parametrize("kind", ["paste", "drop"])
def test_a_pasted_or_dropped_photo_is_the_starting_picture(page, upstream, kind):
    picture = png(10, 10, (250, 200, 0))
    page.get_by_label("What should the picture show").fill("a frame around it")
    page.evaluate(PASTE_OR_DROP, [kind, list(picture)])
    url = chosen_photo(page)
    assert requests.get(url, timeout=5).content == picture
    expect(page.get_by_label("What should the picture show")).to_have_value("a frame around it")  # not pasted over
    page.get_by_role("button", name="Make it").click()
    expect(page.locator("#chain li")).to_have_count(1)
    assert sources_of_last_task(upstream) == [url]


def test_a_file_that_is_no_picture_is_refused_in_words(page, tmp_path):
    fake = tmp_path / "holiday.png"
    fake.write_bytes(b"<svg xmlns='http://www.w3.org/2000/svg'></svg>")
    page.get_by_label("Choose a photo from your device").set_input_files(fake)
    expect(page.get_by_role("alert")).to_contain_text("not a picture the image service can use")
    expect(page.locator("#chosen")).to_be_hidden()


def test_the_choices_follow_the_model_and_the_upstream_receives_them(page, upstream):
    ratio, resolution = page.get_by_label("Aspect ratio"), page.get_by_label("Resolution")
    expect(resolution).to_be_hidden()  # Nano Banana has no resolution
    assert "auto" not in ratio.locator("option").all_inner_texts()
    page.get_by_label("Model").select_option("nano-banana-2")
    expect(resolution).to_be_visible()
    assert {"auto", "1:8", "16:9"} <= set(ratio.locator("option").all_inner_texts())
    ratio.select_option("1:8")
    resolution.select_option("4K")
    make(page, "a tall tower")
    expect(page.locator("#chain li")).to_have_count(1)
    assert last_task(upstream).params["aspectRatio"] == "1:8" and last_task(upstream).params["resolution"] == "4K"

    page.get_by_label("Model").select_option("nano-banana")  # 1:8 is not Nano Banana's: back to the model's choice
    expect(ratio).to_have_value("")
    ratio.select_option("16:9")
    make(page, "make it wide")
    expect(page.locator("#chain li")).to_have_count(2)
    assert last_task(upstream).params["image_size"] == "16:9" and "resolution" not in last_task(upstream).params


def last_task(upstream):
    return max(upstream.tasks.values(), key=lambda task: task.created)


def test_each_picture_downloads(page):
    make(page, "a picture to keep")
    expect(page.locator("#chain li")).to_have_count(1)
    shown = page.locator("#result-image").get_attribute("src")
    for link in (
        page.get_by_role("link", name="Download this picture"),
        page.get_by_role("link", name="Download picture 1: a picture to keep"),
    ):
        with page.expect_download() as download:
            link.click()
        with open(download.value.path(), "rb") as saved:
            assert saved.read() == requests.get(shown, timeout=5).content


def no_sideways_scroll(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


def test_on_a_phone_sized_screen_nothing_scrolls_sideways(browser, service, photo):
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True, has_touch=True)
    try:
        page = context.new_page()
        page.goto(service.url + "/")
        assert no_sideways_scroll(page)
        page.get_by_label("Model").select_option("nano-banana-2")
        page.get_by_label("Choose a photo from your device").set_input_files(photo)
        chosen_photo(page)
        make(page, "a very-long-word-without-spaces-" * 4 + " on a phone")
        expect(page.locator("#chain li")).to_have_count(1)
        make(page, "and again")
        expect(page.locator("#chain li")).to_have_count(2)
        assert no_sideways_scroll(page)
        for control in ("Make it", "Undo", "Start over"):
            box = page.get_by_role("button", name=control).bounding_box()
            assert box["x"] >= 0 and box["x"] + box["width"] <= 360
    finally:
        context.close()


def tab_to(page, label: str) -> None:
    """Press Tab until the control named `label` has the focus (as a person with a keyboard would)."""
    target = (
        page.get_by_label(label).or_(page.get_by_role("button", name=label)).or_(page.get_by_role("link", name=label))
    )
    for _ in range(40):
        page.keyboard.press("Tab")
        if target.first.evaluate("element => element === document.activeElement"):
            return
    raise AssertionError(f"{label!r} cannot be reached with Tab")


def test_everything_works_with_the_keyboard_alone(page, upstream, photo):
    # Playwright turns on catching file choosers when a page first listens for them, and not at once: listen from
    # the start, so the chooser the key opens is caught rather than cancelled by headless Chromium.
    page.on("filechooser", lambda chooser: None)
    tab_to(page, "Choose a photo from your device")
    expect(page.get_by_label("Choose a photo from your device")).to_be_focused()
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(photo)
    url = chosen_photo(page)
    expect(page.get_by_label("What should the picture show")).to_be_focused()  # ready for the change
    page.keyboard.type("make it night")
    tab_to(page, "Model")
    page.keyboard.press("End")  # the last model
    expect(page.get_by_label("Model")).to_have_value("nano-banana-2")
    tab_to(page, "Aspect ratio")
    page.keyboard.type("16:9")
    expect(page.get_by_label("Aspect ratio")).to_have_value("16:9")
    tab_to(page, "Make it")
    page.keyboard.press("Enter")
    expect(page.locator("#chain li")).to_have_count(1)
    assert sources_of_last_task(upstream) == [url] and last_task(upstream).params["aspectRatio"] == "16:9"
    tab_to(page, "Download this picture")
    with page.expect_download() as download:
        page.keyboard.press("Enter")
    assert os.path.getsize(download.value.path()) > 0
    tab_to(page, "Undo")
    page.keyboard.press("Enter")
    expect(page.locator("#chain li")).to_have_count(0)


def test_an_error_is_announced_to_screen_readers(page):
    make(page, "")
    alert = page.get_by_role("alert")
    expect(alert).to_have_text("Please write what the picture should show.")
    expect(page.get_by_label("What should the picture show")).to_be_focused()


def test_no_serious_accessibility_violations(browser, service, photo):
    from axe_playwright_python.sync_playwright import Axe

    for viewport in ({"width": 1280, "height": 900}, {"width": 360, "height": 740}):
        context = browser.new_context(viewport=viewport)
        try:
            page = context.new_page()
            page.goto(service.url + "/")
            page.get_by_label("Choose a photo from your device").set_input_files(photo)
            chosen_photo(page)
            make(page, "a cat")
            expect(page.locator("#chain li")).to_have_count(1)
            make(page, "")  # an error showing, too
            expect(page.get_by_role("alert")).to_be_visible()
            violations = Axe().run(page).response["violations"]
            serious = [f"{v['id']}: {v['help']}" for v in violations if v["impact"] in ("serious", "critical")]
            assert serious == [], serious
        finally:
            context.close()


def test_the_page_opened_as_localhost_follows_and_downloads_its_pictures(browser, service):
    context = browser.new_context()  # PUBLIC_BASE_URL says 127.0.0.1; a person may well type localhost
    try:
        page = context.new_page()
        page.goto(service.url.replace("127.0.0.1", "localhost") + "/")
        make(page, "[delay=4] a picture that outlasts the first answer")
        expect(page.locator("#chain li")).to_have_count(1, timeout=15000)
        with page.expect_download() as download:
            page.get_by_role("link", name="Download this picture").click()
        assert os.path.getsize(download.value.path()) > 0
    finally:
        context.close()


def test_ctrl_enter_while_a_picture_is_made_starts_nothing_more(page, upstream):
    page.get_by_label("What should the picture show").fill("[delay=1] only once please")
    page.get_by_role("button", name="Make it").click()
    page.get_by_label("What should the picture show").press("Control+Enter")
    expect(page.locator("#status")).to_contain_text("Done in", timeout=10000)
    assert len([task for task in upstream.tasks.values() if "only once please" in task.params["prompt"]]) == 1


def test_a_photo_chosen_while_a_picture_is_made_stays_for_the_next(page, photo):
    make(page, "[delay=1.5] the first")
    page.get_by_label("Choose a photo from your device").set_input_files(photo)
    chosen_photo(page)
    expect(page.locator("#status")).to_contain_text("Done in", timeout=10000)
    expect(page.locator("#chosen")).to_be_visible()


def test_edit_this_one_replaces_a_chosen_photo(page, upstream, photo):
    for count, prompt in enumerate(("a first", "a second"), start=1):
        make(page, prompt)
        expect(page.locator("#chain li")).to_have_count(count)
    first = page.locator("#chain img").first.get_attribute("src")
    page.get_by_label("Choose a photo from your device").set_input_files(photo)
    chosen_photo(page)
    page.get_by_role("button", name="Edit picture 1: a first").click()
    expect(page.locator("#chosen")).to_be_hidden()
    make(page, "from the first")
    expect(page.locator("#chain li")).to_have_count(3)
    assert sources_of_last_task(upstream) == [first]

"""`tokenomy demo vlm` in a real browser: Debian's chromium, driven by Playwright with the system executable.

Loads the page, attaches the example scene, asks ref-llava-e2e about it, waits for the reply and saves a screenshot; the
answer must be in the page and the screenshot must not be blank. Skips, saying why, when Playwright or a chromium
executable is missing (`make test` installs chromium with apt-get when it can). Set TOKENOMY_SCREENSHOT_DIR to keep
the screenshot.
"""
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
from PIL import Image

from tests.demo_server import serving_in_thread

QUESTION = "What color is the small object?"
REPLY_DEADLINE_MS = 240_000  # a guard against a reply that never comes, not a speed requirement


def chromium_executable():
    for candidate in (os.environ.get("TOKENOMY_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install 'tokenomy[demo]')")
    executable = chromium_executable()
    if executable is None:
        pytest.skip("no chromium executable on PATH (Debian: apt-get install chromium; or set TOKENOMY_CHROMIUM)")
    with playwright.sync_playwright() as driver:
        # --no-sandbox: chromium refuses to start its sandbox as root, which CI containers often are
        browser = driver.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        yield browser
        browser.close()


def test_one_chat_turn_in_chromium(browser, tmp_path):
    from tokenomy.demo.vlm import build_app, example_scene

    screenshot = Path(os.environ.get("TOKENOMY_SCREENSHOT_DIR") or tmp_path) / "demo-vlm.png"
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with serving_in_thread(build_app()) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        fetched = []
        page.on("request", lambda request: fetched.append(request.url))
        page.goto(url)
        message = page.locator("textarea").first
        message.wait_for()
        page.locator("input[type=file]").first.set_input_files(example_scene())
        message.fill(QUESTION)
        # the attachment must have finished uploading (its thumbnail is served by the app) before the message is sent
        page.locator("[aria-label='Uploaded files'] img[src*='gradio_api/file=']").first.wait_for()
        message.press("Enter")
        reply = page.locator("[data-testid=bot]").filter(has_text="kept / in").first
        reply.wait_for(timeout=REPLY_DEADLINE_MS)
        picture = page.locator(".block", has_text="Kept tokens (tokenomy.vis)").locator("img").first
        picture.wait_for()
        page.wait_for_function("image => image.complete && image.naturalWidth > 0", arg=picture.element_handle())
        page.screenshot(path=str(screenshot), full_page=True)
        text = reply.inner_text()
        page.close()
    assert text.startswith("yellow") and "64 / 256" in text, text
    # the page fetched from the demo only: no analytics, no web fonts, nothing beyond 127.0.0.1
    web = [address for address in fetched if address.startswith("http")]
    assert web and [address for address in web if urlparse(address).hostname != "127.0.0.1"] == []
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).astype(np.float32)
    assert pixels.shape[0] >= 900 and pixels.shape[1] == 1280
    assert pixels.std() > 10 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # text and pictures, not a blank page

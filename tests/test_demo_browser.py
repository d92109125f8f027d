"""The demo in a real browser: headless Chromium driven by Selenium.

One server (the shipped models, lazily loaded) and one browser serve the whole module. A
newcomer's path: the page opens, each shipped model is picked, New scene, an example
question is clicked, the answer appears with the truth beside it (✓ / ✗), Inspect draws
what the model looked at; then a corrupt file and a huge image are uploaded (a clear
message each) and the next question is still answered. Screenshots go to a temporary
folder; with ``MMKIT_SCREENSHOT=1`` the README's ``docs/img/demo.png`` is written too.

Chromium and its driver come from Debian (``apt-get install chromium chromium-driver``,
done by ``.ci/run`` where it runs as root); without them these tests skip.
"""
from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")

from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="Chromium or chromedriver is not installed (Debian: apt-get install chromium chromium-driver)")

OPTIONS = "ul.option-list li[aria-label]"  # the open dropdown's entries
README_SHOT = Path(__file__).resolve().parents[1] / "docs" / "img" / "demo.png"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_assets):
    """The demo over the shipped models, launched once for the module."""
    from mmkit.demo import launch
    from mmkit.zoo import SHIPPED_MODELS

    app = launch([], port=_free_port(), block=False, warm=False)
    shipped = [e.label for e in app.mmkit_store.entries if e.shipped and e.error is None]
    if not shipped or app.mmkit_store.entries[0].recipe != SHIPPED_MODELS[0]:
        app.close()
        pytest.skip("the shipped models are not in assets/tiny/models (mmkit zoo models builds them)")
    yield app
    app.close()


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1250", "--force-device-scale-factor=1"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("screenshots")


def _wait(driver, cond, timeout: float = 60.0, what: str = ""):
    def safe(d):
        try:
            return cond(d)
        except StaleElementReferenceException:  # Gradio re-rendered the element: look again
            return False
    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(safe, message=what)


def _open(driver, url: str) -> None:
    driver.get(url)
    _wait(driver, lambda d: d.find_elements(By.ID, "new-scene"), 30, "the page")


def _chat(driver) -> str:
    return driver.find_element(By.ID, "chat").text


def _examples(driver) -> list:
    return [b for b in driver.find_elements(By.CSS_SELECTOR, ".example-question") if b.is_displayed()]


def _pick(driver, label: str) -> None:
    box = driver.find_element(By.CSS_SELECTOR, "#model-picker input")
    box.click()
    option = _wait(driver, lambda d: next((o for o in d.find_elements(By.CSS_SELECTOR, OPTIONS)
                                           if o.get_attribute("aria-label") == label), None), 15, f"option {label}")
    option.click()
    _wait(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#model-picker input").get_attribute("value") == label,
          15, f"{label} picked")
    _wait(driver, lambda d: label.split()[0] in d.find_element(By.ID, "model-card").text, 60, "the model's card")


def _ask(driver, text: str, files=()) -> None:
    for f in files:
        upload = driver.find_element(By.CSS_SELECTOR, "#message input[type=file]")
        driver.execute_script("arguments[0].value = '';", upload)  # chromedriver appends to a multiple input
        upload.send_keys(str(f))
    area = driver.find_element(By.CSS_SELECTOR, "#message textarea")
    area.send_keys(text)
    if files:  # the upload shows as a thumbnail before it is sent
        time.sleep(1.0)
    area.send_keys(Keys.ENTER)


def test_page_opens_with_every_shipped_model(served, browser):
    from mmkit.zoo import SHIPPED_MODELS

    t0 = time.perf_counter()
    _open(browser, served.local_url)
    assert time.perf_counter() - t0 < 30
    picker = browser.find_element(By.CSS_SELECTOR, "#model-picker input")
    assert picker.get_attribute("value") == f"{SHIPPED_MODELS[0]} (shipped)"  # the reference is the default
    assert "VQA" in browser.find_element(By.ID, "model-card").text
    picker.click()
    options = [o.get_attribute("aria-label")
               for o in _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, OPTIONS), 15, "the model list")]
    shipped = [n for n in SHIPPED_MODELS if (served.mmkit_store.entries[0].path.parent / n).is_dir()]
    assert [o.split()[0] for o in options][:len(shipped)] == shipped
    picker.send_keys(Keys.ESCAPE)


def test_each_model_new_scene_example_truth_and_inspect(served, browser, shots):
    labels = [e.label for e in served.mmkit_store.entries if e.shipped and e.error is None]
    _open(browser, served.local_url)
    for i, label in enumerate(labels):
        if i:
            _pick(browser, label)
        seed = browser.find_element(By.CSS_SELECTOR, "#seed input, #seed textarea")
        if i == 0:  # a typed seed (the README's picture is the same scene every time)
            seed.send_keys("0")
            browser.find_element(By.ID, "new-scene").click()
            _wait(browser, lambda d: "seed 0 " in d.find_element(By.ID, "scene-info").text, 60, "scene 0")
        elif i == 1:  # another model keeps the scene and its questions: compare models on one picture
            _wait(browser, lambda d: f"for {label}" in _chat(d), 30, "the same scene, for the new model")
        else:  # a random seed
            seed.send_keys(Keys.CONTROL, "a", Keys.BACKSPACE)
            browser.find_element(By.ID, "new-scene").click()
            _wait(browser, lambda d: "seed 0 " not in d.find_element(By.ID, "scene-info").text, 60, "a new scene")
        buttons = _wait(browser, lambda d: len(_examples(d)) == 5 and _examples(d), 60, "5 example questions")
        assert "Scene seed" in browser.find_element(By.ID, "scene-info").text
        assert browser.find_elements(By.CSS_SELECTOR, "#chat img"), "the scene is shown in the chat"
        question = buttons[0].text
        buttons[0].click()
        _wait(browser, lambda d: "true answer is" in _chat(d), 90, f"{label}: the verdict")
        chat = _chat(browser)
        after = chat[chat.rindex(question) + len(question):]
        answer, verdict = after.split("true answer is")[0].rsplit("\n", 1)
        assert answer.strip() and not answer.strip().startswith("⚠️"), chat  # the model's answer, then the truth
        assert verdict.strip()[:1] in "✓✗", verdict
        assert "Score in this conversation: " in browser.find_element(By.ID, "score").text
        browser.find_element(By.ID, "inspect").click()
        _wait(browser, lambda d: "What this picture means" in d.find_element(By.ID, "inspect-info").text, 90,
              f"{label}: Inspect")
        _wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#inspect-gallery img"), 30, "heatmaps")
        if label.startswith("flamingo"):  # its gates per layer and its media mask, beside the maps
            gallery = browser.find_element(By.ID, "inspect-gallery").get_attribute("innerHTML")
            assert "gates" in gallery and "media mask" in gallery
        browser.save_screenshot(str(shots / f"{i}_{label.split()[0]}.png"))
        if i == 0 and os.environ.get("MMKIT_SCREENSHOT") == "1":  # the README's picture, on request only
            README_SHOT.parent.mkdir(parents=True, exist_ok=True)
            tmp = README_SHOT.with_suffix(".tmp.png")
            browser.save_screenshot(str(tmp))
            tmp.replace(README_SHOT)
    assert len(list(shots.glob("*.png"))) == len(labels)


def test_bad_uploads_get_a_message_and_the_chat_goes_on(served, browser, shots, tmp_path):
    from test_demo import huge_png

    corrupt, huge = tmp_path / "corrupt.png", tmp_path / "huge.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    huge.write_bytes(huge_png())
    _open(browser, served.local_url)
    browser.find_element(By.ID, "new-scene").click()
    _wait(browser, lambda d: len(_examples(d)) == 5, 60, "a new scene")
    for path, phrase in ((corrupt, "corrupt"), (huge, "10000x10000")):
        n = _chat(browser).count("⚠️")
        _ask(browser, "What colour is the circle?", [path])
        _wait(browser, lambda d: _chat(d).count("⚠️") > n, 60, f"the message about {path.name}")
        assert phrase in _chat(browser) and path.name in _chat(browser), _chat(browser)
    browser.save_screenshot(str(shots / "bad_uploads.png"))
    before = _chat(browser).count("true answer is")
    _ask(browser, "How many objects are there?")  # the scene is still the conversation's image
    _wait(browser, lambda d: _chat(d).count("true answer is") > before, 90, "the next answer")
    # a photo: answered, with the honest note under the answer, and no verdict (no scene graph)
    photo = tmp_path / "photo.jpg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).save(photo)
    _ask(browser, "What is in the image?", [photo])
    _wait(browser, lambda d: "only know ShapesWorld" in _chat(d), 90, "the note about photos")
    chat = _chat(browser)
    assert chat.count("true answer is") == before + 1 and "⚠️" not in chat[chat.rindex("What is in the image?"):]

"""The web demo: the comparison behind it on a tiny model, and the page itself driven in headless Chromium."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import make_image
from PIL import Image

from crop.compare import MAX_PIXELS, compare
from crop.errors import ConfigError, ImageError
from crop.localize import FixedLocalizer
from crop.region import Region
from crop.stats import DROPPED

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "results" / "demo_screenshot.png"


@pytest.fixture(scope="module")
def tiny(processor):
    from crop.testing.llava import build_model

    return build_model(seed=0), processor


def test_compare_answers_both_ways_and_draws_what_was_kept(tiny):
    model, processor = tiny
    region = Region.from_grid([0, 0, 3, 3])
    result = compare(model, processor, make_image(), "what colour is it ?", localizer=FixedLocalizer(region))
    assert result.region == region
    assert result.full.stats.kept_tokens == result.full.stats.image_tokens
    assert result.pruned.stats.kept_tokens < result.full.stats.image_tokens
    assert result.full.prefill_seconds > 0 and result.pruned.prefill_seconds > 0
    assert result.overlay.size == make_image().size
    assert result.stage_overlays == []


def test_staged_methods_get_one_overlay_per_stage(tiny):
    model, processor = tiny
    result = compare(model, processor, make_image(), "what colour is it ?", method="pyramiddrop", budget=4)
    stages = result.pruned.stats.stages
    assert len(result.stage_overlays) == len(stages) >= 2
    kept = [int((cells != DROPPED).sum()) for _, cells in stages]
    assert kept == sorted(kept, reverse=True) and kept[-1] == 4
    assert all(image.size == make_image().size for _, image in result.stage_overlays)


@pytest.mark.parametrize(
    ("image", "question", "method", "budget", "error", "words"),
    [
        (None, "what ?", "crop", None, ImageError, "no image"),
        (b"not an image", "what ?", "crop", None, ImageError, "cannot read image"),
        ("huge", "what ?", "crop", None, ImageError, "too large"),
        ("ok", "   ", "crop", None, ConfigError, "empty question"),
        ("ok", "what ?", "fastv", None, ConfigError, "needs a budget"),
        ("ok", "what ?", "nonsense", 4, ConfigError, "unknown method"),
        ("ok", "what ?", "fastv", 10_000, ConfigError, "budget"),
    ],
)
def test_bad_input_is_refused_with_a_message(tiny, image, question, method, budget, error, words):
    model, processor = tiny
    if image == "ok":
        image = make_image()
    elif image == "huge":
        image = Image.new("RGB", (MAX_PIXELS // 1000 + 1, 1000))
    localizer = FixedLocalizer(Region.full())
    with pytest.raises(error, match=words):
        compare(model, processor, image, question, method=method, budget=budget, localizer=localizer)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _browser():
    """Headless Chromium through Selenium and Debian's chromedriver, or a skip saying what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    pytest.importorskip("gradio", reason="the demo needs gradio (pip install 'crop[demo]')")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1300"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))


@pytest.fixture(scope="module")
def server():
    """`crop serve-demo` on a free local port with the shipped model, stopped after the module."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "crop.cli", "serve-demo", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 180
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"the demo server exited: {process.stdout.read()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the demo server did not answer within 180 s")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_the_page_answers_both_ways_shows_counts_and_survives_bad_input(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from crop.synth.assets import SHIPPED_MODEL, model_task
    from crop.synth.scene import make_sample

    browser = _browser()
    wait = WebDriverWait(browser, 120)

    def text_of(element_id: str) -> str:
        return browser.find_element(By.ID, element_id).text

    def answer(element_id: str) -> str:
        return browser.find_element(By.CSS_SELECTOR, f"#{element_id} textarea").get_attribute("value")

    def set_question(text: str) -> None:
        box = browser.find_element(By.CSS_SELECTOR, "#question textarea")
        box.clear()
        box.send_keys(text)

    try:
        browser.get(server)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        set_question("what digit is on the red object ?")
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda b: "no image" in text_of("message"))

        sample = make_sample("test", 0, model_task(SHIPPED_MODEL))
        picture = SCREENSHOT.parent / "demo_input.png"
        picture.parent.mkdir(exist_ok=True)
        sample.image.save(picture)
        browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(picture))
        set_question(sample.question)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#image img"))
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda b: answer("pruned-answer") and "visual tokens" in text_of("pruned-info"))
        assert text_of("message") == ""
        assert answer("full-answer")
        assert "256 into the LLM, 256 kept" in text_of("full-info")
        assert "256 in the image" in text_of("pruned-info") and "region:" in text_of("pruned-info")
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#overlay img"))
        browser.save_screenshot(str(SCREENSHOT))
        picture.unlink()

        path_box = browser.find_element(By.CSS_SELECTOR, "#model-path textarea, #model-path input")
        path_box.clear()
        path_box.send_keys("/no/such/model")
        browser.find_element(By.XPATH, "//button[text()='Load']").click()
        wait.until(lambda b: "Model failed to load" in text_of("message"))
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda b: text_of("message") == "")
        assert answer("pruned-answer")
    finally:
        browser.quit()

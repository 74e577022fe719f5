"""The page at GET / in a real headless Chromium (Selenium), against the real server on 127.0.0.1.

One server (the shipped shapes model, so that shapes.jpg has real boxes; API key on) and one browser for
the module, plus a server with RTMDET_WEB_UI=false. Needs Debian's `chromium` and
`chromium-driver` (.ci/run installs them).
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from svc_helpers import API_KEY, REPO, ServerProcess

SHAPES = REPO / "examples" / "shapes.jpg"
SHIPPED_WEIGHTS = REPO / "weights" / "rtmdet_tiny_shapes.pth"
WAIT_S = 60.0  # longest wait for an answer (the first request compiles the model: no warm-up here)


def find_chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Both servers of the module, started side by side (each start is mostly imports): the page's, and one
    with RTMDET_WEB_UI=false."""
    logs = tmp_path_factory.mktemp("web_ui")
    # The page's server holds two models (the same file under two names), so the page shows its model picker.
    models = ("--model", f"shapes={SHIPPED_WEIGHTS}", "--model", f"second={SHIPPED_WEIGHTS}")
    with (ServerProcess(SHIPPED_WEIGHTS, logs / "server.log", *models, weights_flag=False, RTMDET_API_KEY=API_KEY,
                        RTMDET_WARMUP="false") as on,
          ServerProcess(SHIPPED_WEIGHTS, logs / "no_ui.log", RTMDET_WEB_UI="false", RTMDET_WARMUP="false") as off):
        on.wait_ready()
        wait_listening(off)
        yield on, off


def wait_listening(srv: ServerProcess) -> None:
    """Until /healthz answers: the routes exist from then on, before the model is loaded."""
    end = time.monotonic() + WAIT_S
    while True:
        assert srv.proc.poll() is None, srv.log_path.read_text()
        try:
            if httpx.get(f"{srv.http}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < end, f"no /healthz after {WAIT_S} s:\n{srv.log_path.read_text()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def shapes_server(servers):
    return servers[0]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    found = find_chromium()
    if found is None:
        message = "needs chromium and chromedriver: apt-get install chromium chromium-driver"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI installs them (.ci/run): missing there is a broken install, not a skip
        pytest.skip(message)
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1000", "--disable-extensions", "--no-first-run",
                # A synthetic camera (a moving test pattern), allowed without a prompt.
                "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"):
        options.add_argument(arg)
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1], log_output=str(log)))
    driver.set_page_load_timeout(30)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def post_detect(server: ServerProcess, path: Path, auth: dict[str, str]) -> httpx.Response:
    """What the page sends: the file as the multipart field `image`."""
    return httpx.post(f"{server.http}/detect", files={"image": (path.name, path.read_bytes())}, headers=auth,
                      timeout=WAIT_S)


def open_page(driver, base: str, key: str | None) -> None:
    driver.get(f"{base}/")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"{base}/")
    field = driver.find_element(By.ID, "api-key")
    assert field.is_displayed(), "the server has an API key: the page must show the key field"
    field.clear()
    if key is not None:
        field.send_keys(key)


def upload(driver, *paths: Path):
    """Send `paths` through the page's file input at once; the newest card, once all are answered (done or error)."""
    wait_for_cards(driver, lambda: driver.find_element(By.ID, "file-input").send_keys("\n".join(map(str, paths))),
                   len(paths))
    return driver.find_element(By.CSS_SELECTOR, "#results .card")  # the newest card comes first


def wait_for_cards(driver, action, count: int = 1) -> None:
    before = len(driver.find_elements(By.CSS_SELECTOR, "#results .card"))
    action()
    WebDriverWait(driver, WAIT_S).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .card:not([data-state=pending])")) >= before + count)


def listed(card) -> list[dict]:
    return [json.loads(row.get_attribute("data-detection"))
            for row in card.find_elements(By.CSS_SELECTOR, ".dets tbody tr")]


def same_up_to_batching(shown: list[dict], answered: list[dict]) -> bool:
    """The same detections, in the same order, to within what batching moves: an image run in a batch with another
    (the page sends its images at once) and the same image alone go through different kernels (streams of one thread
    against the whole batch on all threads), whose sums differ in the last float bits: ~3e-5 px, which can tip a
    box coordinate's rounding to two decimals by 0.01."""
    return len(shown) == len(answered) and all(
        a["label"] == b["label"] and a["class_name"] == b["class_name"] and abs(a["score"] - b["score"]) <= 1e-4
        and max(abs(x - y) for x, y in zip(a["box"], b["box"], strict=True)) <= 0.011
        for a, b in zip(shown, answered))


def canvas_rgb(driver, card) -> np.ndarray:
    """The card's canvas as an H x W x 3 array, read in the page with getImageData."""
    width, height, b64 = driver.execute_script(
        "const c = arguments[0].querySelector('canvas');"
        "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let s = '';"
        "for (let i = 0; i < px.length; i += 0x8000) s += String.fromCharCode.apply(null, px.subarray(i, i + 0x8000));"
        "return [c.width, c.height, btoa(s)]", card)
    return np.frombuffer(base64.b64decode(b64), np.uint8).reshape(height, width, 4)[..., :3].astype(np.int16)


def detect_requests(driver) -> int:
    return driver.execute_script(
        "return performance.getEntriesByType('resource').filter(e => e.name.includes('/detect')).length")


def set_threshold(driver, value: float) -> None:
    driver.execute_script("const s = document.getElementById('threshold'); s.value = arguments[0];"
                          "s.dispatchEvent(new Event('input'));", str(value))


def test_page_lists_and_draws_what_post_detect_answers(shapes_server, auth, browser, tmp_path):
    expected = post_detect(shapes_server, SHAPES, auth).json()
    assert len(expected["detections"]) >= 5, "the shipped model finds the shapes of shapes.jpg"

    open_page(browser, shapes_server.http, API_KEY)
    card = upload(browser, SHAPES)
    assert card.get_attribute("data-state") == "done", card.text
    assert listed(card) == expected["detections"]
    first_row = card.find_element(By.CSS_SELECTOR, ".dets tbody tr").text
    first = expected["detections"][0]
    assert first["class_name"] in first_row and f"{first['score']:.3f}" in first_row
    stages = {row.get_attribute("data-stage") for row in card.find_elements(By.CSS_SELECTOR, ".timing tr[data-stage]")}
    assert stages == set(expected["timing"])  # every stage of the response, the batch size and the total

    shot = tmp_path / "web_ui.png"
    browser.save_screenshot(str(shot))
    print(f"\nweb UI screenshot: {shot}")

    # The first box's outline: the canvas differs there from the bare image (decoded here, not by the page).
    bare = np.asarray(Image.open(SHAPES).convert("RGB"), dtype=np.int16)
    drawn = canvas_rgb(browser, card)
    assert drawn.shape == bare.shape and drawn.shape[:2] == (expected["height"], expected["width"])
    x1, y1, x2, y2 = (int(round(v)) for v in first["box"])
    top, left = (slice(y1, y1 + 1), slice(x1, x2)), (slice(y1, y2), slice(x1, x1 + 1))
    for edge in (top, left):
        changed = np.abs(drawn[edge] - bare[edge]).max(axis=-1) > 48
        assert changed.mean() > 0.6, f"only {changed.mean():.0%} of an edge of the first box is drawn"

    # Filtering is local: a higher threshold and a hidden class re-draw without another upload.
    uploads = detect_requests(browser)
    set_threshold(browser, 1.0)  # nothing scores above 1: the canvas shows the bare image again
    assert listed(card) == []
    plain = canvas_rgb(browser, card)
    assert (np.abs(plain - bare).max(axis=-1) <= 16).mean() > 0.99
    set_threshold(browser, 0.6)
    assert listed(card) == [d for d in expected["detections"] if d["score"] > 0.6]
    hide = first["class_name"]
    browser.find_element(By.CSS_SELECTOR, f"#classes input[value='{hide}']").click()
    assert listed(card) == [d for d in expected["detections"] if d["score"] > 0.6 and d["class_name"] != hide]
    assert detect_requests(browser) == uploads


def test_unsupported_file_shows_the_servers_415_message(shapes_server, auth, browser, tmp_path):
    gif = tmp_path / "shapes.gif"
    Image.open(SHAPES).convert("P").save(gif, format="GIF")
    answer = post_detect(shapes_server, gif, auth)
    assert answer.status_code == 415

    open_page(browser, shapes_server.http, API_KEY)
    card = upload(browser, gif)
    assert card.get_attribute("data-state") == "error"
    shown = card.find_element(By.CSS_SELECTOR, ".error").text
    assert "Unsupported file type" in shown and answer.json()["detail"] in shown


def test_without_the_key_the_page_says_one_is_needed(shapes_server, browser):
    open_page(browser, shapes_server.http, None)
    card = upload(browser, SHAPES)
    assert card.get_attribute("data-state") == "error"
    shown = card.find_element(By.CSS_SELECTOR, ".error").text
    assert "needs an API key" in shown and "Authorization: Bearer" in shown
    assert "needs an API key" in browser.find_element(By.ID, "notice").text  # said on load too, before any upload

    browser.find_element(By.ID, "api-key").send_keys("not-the-key")
    card = upload(browser, SHAPES)
    assert "refused this API key" in card.find_element(By.CSS_SELECTOR, ".error").text


def test_several_images_and_a_webcam_frame(shapes_server, auth, browser):
    coffee = REPO / "examples" / "coffee.jpg"
    open_page(browser, shapes_server.http, API_KEY)
    upload(browser, SHAPES, coffee)
    cards = {card.find_element(By.TAG_NAME, "h2").text: card
             for card in browser.find_elements(By.CSS_SELECTOR, "#results .card")}
    assert set(cards) == {"shapes.jpg", "coffee.jpg"}
    for name, path in (("shapes.jpg", SHAPES), ("coffee.jpg", coffee)):
        shown, answered = listed(cards[name]), post_detect(shapes_server, path, auth).json()["detections"]
        assert same_up_to_batching(shown, answered), (shown, answered)

    # Chromium's fake camera: a frame is captured from the video, sent as a JPEG, and answered like a file.
    browser.find_element(By.ID, "webcam-start").click()
    WebDriverWait(browser, WAIT_S).until(
        lambda d: d.execute_script("return document.getElementById('video').videoWidth"))
    wait_for_cards(browser, browser.find_element(By.ID, "capture").click)
    card = browser.find_element(By.CSS_SELECTOR, "#results .card")
    assert card.find_element(By.TAG_NAME, "h2").text == "webcam frame 1"
    assert card.get_attribute("data-state") == "done", card.text
    video = browser.execute_script("const v = document.getElementById('video'); return [v.videoWidth, v.videoHeight]")
    canvas = browser.execute_script("const c = arguments[0].querySelector('canvas'); return [c.width, c.height]", card)
    assert canvas == video and f"{video[0]}×{video[1]}" in card.text  # the size the server decoded
    browser.find_element(By.ID, "webcam-stop").click()


def test_web_ui_false_is_404(servers):
    srv = servers[1]
    assert httpx.get(f"{srv.http}/", timeout=5).status_code == 404
    assert "rtmdet serve: http://" in srv.log_path.read_text() and "in a browser" not in srv.log_path.read_text()


def test_page_is_served_with_the_servers_settings(shapes_server):
    page = httpx.get(f"{shapes_server.http}/", timeout=5)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '"apiKeyRequired": true' in page.text and "connect-src 'self'" in page.headers["content-security-policy"]
    assert "/" not in httpx.get(f"{shapes_server.http}/openapi.json", timeout=5).json()["paths"]
    assert f"open {shapes_server.http}/ in a browser" in shapes_server.log_path.read_text()


def test_the_model_picker_lists_the_served_models_and_sends_to_the_one_picked(shapes_server, auth, browser):
    from selenium.webdriver.support.ui import Select

    served = httpx.get(f"{shapes_server.http}/v1/models", headers=auth, timeout=WAIT_S).json()
    names = [m["model"] for m in served["models"]]
    assert names == ["shapes", "second"]
    open_page(browser, shapes_server.http, API_KEY)
    browser.execute_script("loadModels()")  # the key was typed after the page asked: ask again with it
    WebDriverWait(browser, WAIT_S).until(lambda d: d.find_element(By.ID, "picker").is_displayed())
    picker = Select(browser.find_element(By.ID, "model"))
    assert [o.get_attribute("value") for o in picker.options] == names
    assert picker.first_selected_option.get_attribute("value") == "shapes"  # the server's default
    picker.select_by_value("second")
    browser.execute_script("document.getElementById('model').dispatchEvent(new Event('change'))")
    card = upload(browser, SHAPES)
    assert card.get_attribute("data-state") == "done", card.text
    sent = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('/detect'))")
    assert "/v1/models/second/detect" in sent[-1]
    want = httpx.post(f"{shapes_server.http}/v1/models/second/detect", files={"image": (SHAPES.name,
                      SHAPES.read_bytes())}, headers=auth, timeout=WAIT_S).json()
    assert listed(card) == want["detections"] and want["model"]["model"] == "second"

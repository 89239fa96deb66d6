"""`ademvl serve`: the page's logic, and the page itself driven in a real headless Chromium.

The browser tests start `ademvl serve` on a free loopback port with a tiny random checkpoint (and
a small synthetic data set beside it, for the examples), open the page in Debian's chromium via
chromium-driver and selenium, and compare what the page shows with the Python API on the same
checkpoint. They skip only outside CI when chromium is not installed (`apt-get install chromium
chromium-driver`). ADEMVL_SCREENSHOT=docs/serve.png also writes the page's screenshot there.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ademvl import AdemVLModel, Sample
from ademvl.images import ImageError, load_image
from ademvl.inspect import drop_decisions, where_it_looked
from ademvl.model import decoder_layers
from ademvl.tasks import shapes
from ademvl.web import check_question, options, read_upload

from .conftest import perturb, samples, tiny_model

MAX_NEW = 64  # the page's default "max new tokens"
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1280,1300"]


# ---- where it looked (no browser) -------------------------------------------------------------
def looked_model() -> AdemVLModel:
    model = tiny_model()
    perturb(model)
    return model


def generated(model: AdemVLModel, image, prompt: str, n: int = 5) -> list[int]:
    batch = model.processor([Sample("q", image, [(prompt, "")])], train=False)
    return model.generate(**{k: v for k, v in batch.items() if k != "labels"}, max_new_tokens=n, do_sample=False)[0].tolist()


def test_first_answer_row_is_the_demo_figures_drop_decision() -> None:
    """The page's row for the first answer token and the demo's Fig. 3 (last prompt token) agree."""
    model, s = looked_model(), samples()[0]
    ids = generated(model, s.image, s.turns[0][0])
    looked = where_it_looked(model, s.image, s.turns[0][0], ids, layers=[0, 1])
    demo = drop_decisions(model, [s], [0, 1])[0]
    assert len(looked.tokens) == len(ids) == 5
    for layer in (0, 1):
        assert torch.equal(looked.dropped[layer][0], demo[layer])
        assert looked.dropped[layer].sum(1).tolist() == [int(0.1 * 20)] * 5  # floor(gamma N) per row, N = 16 + 4


def test_weights_shown_are_the_ones_the_fusion_applied() -> None:
    """alpha * A @ V with the page's A equals the fusion term the layer added, at every answer row."""
    model, s = looked_model(), samples()[2]
    prompt = s.turns[0][0]
    ids = generated(model, s.image, prompt)
    looked = where_it_looked(model, s.image, prompt, ids, layers=[1])
    mlp = decoder_layers(model.llm)[1].mlp
    seen = {}

    def catch(m, a, o) -> None:  # runs after the fusion's own hook: o = FFN(h_n) + fusion term
        seen["term"] = (o - m.forward(a[0]))[0, -len(ids):]
        seen["v"] = model.memory.values[0]

    hook = mlp.register_forward_hook(catch)
    try:
        batch = model.processor([Sample("q", s.image, [(prompt, "")])], train=False)
        extra = torch.tensor([ids[:-1]])
        with torch.no_grad():
            model(input_ids=torch.cat([batch["input_ids"], extra], 1),
                  attention_mask=torch.cat([batch["attention_mask"], torch.ones_like(extra)], 1),
                  pixel_values=batch["pixel_values"], image_mask=batch["image_mask"])
    finally:
        hook.remove()
    expected = model.config.alpha * looked.weights[1] @ seen["v"]
    assert seen["term"].abs().max() > 1e-3  # the fusion does add something here
    torch.testing.assert_close(seen["term"], expected, rtol=1e-4, atol=1e-5)
    assert (looked.weights[1][looked.dropped[1]] == 0).all()  # dropped entries carry no weight


# ---- the page's checks (no browser) -----------------------------------------------------------
def test_options_are_read_from_a_scienceqa_prompt() -> None:
    prompt = "Context: N/A\nQuestion: What color is the shape?\nOptions: (A) red (B) dark green (C) blue\nResponse:"
    assert options(prompt) == ["red", "dark green", "blue"]
    assert options("What colour is the shape?") == []
    assert options("Options: (B) red (C) blue") == []  # letters must start at A


def test_empty_and_too_long_questions_are_refused_with_the_fix() -> None:
    model = tiny_model(max_length=40)
    with pytest.raises(ValueError, match="the question is empty"):
        check_question(model, None, "   ")
    long = "red " * 60
    with pytest.raises(ValueError, match=r"too long: \d+ tokens .* max_length=40; shorten it by \d+ tokens"):
        check_question(model, None, long)
    assert check_question(model, None, "  What colour?  ") == "What colour?"


def test_uploads_follow_the_image_rules_and_name_the_users_file(tmp_path: Path) -> None:
    (tmp_path / "gradio-copy.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match=r"^notes\.png: cannot read this image .*re-encode it as PNG or JPEG"):
        read_upload({"path": str(tmp_path / "gradio-copy.png"), "orig_name": "notes.png"})
    Image.new("1", (20000, 10000)).save(tmp_path / "bomb.png")  # 200 M pixels > PIL's 2 x 89 M limit
    with pytest.raises(ImageError, match=r"^huge\.png: image too large to decode safely"):
        read_upload({"path": str(tmp_path / "bomb.png"), "orig_name": "huge.png"})
    Image.fromarray(np.full((3, 4), 100 * 256, dtype=np.uint16)).save(tmp_path / "deep.png")  # 16-bit grey
    img = read_upload({"path": str(tmp_path / "deep.png"), "orig_name": "deep.png"})
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (100, 100, 100)
    assert read_upload(None) is None  # no image: the "Image: N/A" path


def test_serve_names_a_missing_checkpoint_before_loading_anything(tmp_path: Path, capsys) -> None:
    from ademvl.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "nope")]) == 2
    assert f"{tmp_path / 'nope'}: no checkpoint directory here" in capsys.readouterr().err


# ---- the page in a real browser ---------------------------------------------------------------
def need(what: str, ok: bool, fix: str) -> None:
    """Skip when a browser-test dependency is absent, except in CI, where that is a failure."""
    if not ok:
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{what} not found: {fix}")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny checkpoint with a small synthetic data set beside it, as `ademvl demo` lays them out."""
    run = tmp_path_factory.mktemp("serve")
    looked_model().save_pretrained(run / "checkpoint")
    shapes.write_dataset(run / "data", 60, 0)  # its test split has every question type
    return run


@pytest.fixture(scope="module")
def model(run_dir: Path) -> AdemVLModel:
    return AdemVLModel.from_pretrained(run_dir / "checkpoint")


@pytest.fixture(scope="module")
def server(run_dir: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`ademvl serve` on a free loopback port; (url, process)."""
    need("chromium", bool(shutil.which("chromium") and shutil.which("chromedriver")),
         "apt-get install chromium chromium-driver")
    need("selenium and gradio", all(_importable(m) for m in ("selenium", "gradio")), "pip install -e '.[test,web]'")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(run_dir / "serve.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "ademvl", "serve", "--checkpoint", str(run_dir / "checkpoint"),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        yield f"http://127.0.0.1:{port}/", proc  # still starting: `wait_up` before the first page load
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()


def wait_up(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"ademvl serve did not come up:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="module")
def browser(server, run_dir: Path, tmp_path_factory) -> Iterator[Callable[..., object]]:
    """browser(i) opens the page afresh (a new Gradio session) in headless Chromium number i.

    Each Chromium has its own profile; they start once per module, as starting one costs seconds.
    """
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    opened: dict[int, object] = {}

    def open_page(i: int = 0):
        if i not in opened:
            opts = webdriver.ChromeOptions()
            opts.binary_location = shutil.which("chromium")
            for flag in BROWSER_FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"]:
                opts.add_argument(flag)
            opened[i] = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        driver = opened[i]
        wait_up(*server, run_dir / "serve.log")
        driver.get(server[0])
        _until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#question textarea"))
        return driver

    yield open_page
    for d in opened.values():
        d.quit()


def ask(driver, question: str, image: Path | None = None, wait: bool = True) -> str:
    """Fill the page and press Ask; with wait, return the status line once the answer is done."""
    from selenium.webdriver.common.by import By

    if image is not None:
        driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(image))
        _until(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
    box = driver.find_element(By.CSS_SELECTOR, "#question textarea")
    box.clear()
    box.send_keys(question)
    before = driver.find_element(By.ID, "status").text
    driver.find_element(By.ID, "ask").click()
    if not wait:
        return ""
    # The status still shows the previous request's final line until this one starts ("Generating...")
    # or fails: wait for it to change, so that line is not read as this request's (a repeat of the
    # very same message stays the same, hence the short wait).
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "status").text != before)
    except TimeoutException:
        pass
    return finished(driver)


def finished(driver) -> str:
    from selenium.webdriver.common.by import By

    def done(d):
        text = d.find_element(By.ID, "status").text
        return text if text.startswith(("Answered", "Error")) else None

    return _until(driver, done)


def _until(driver, condition, timeout: float = 120):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition)


def shown_answer(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_property("value")


def data_images(run_dir: Path) -> list[Path]:
    """The data set's test images (colour first)."""
    from ademvl.tasks import scienceqa as sqa

    return [Path(p["image_path"]) for p in sqa.read_problems(run_dir / "data", "test").values() if p.get("image_path")]


def test_page_answers_as_model_answer_does(server, browser, model, run_dir: Path) -> None:
    image, question = data_images(run_dir)[0], "What colour is the shape?"
    driver = browser()
    assert ask(driver, question, image).startswith("Answered")
    expected = model.answer([load_image(image)], [question], max_new_tokens=MAX_NEW, do_sample=False)[0]
    assert expected and shown_answer(driver) == expected


def test_fusion_picture_is_the_inspect_render_at_the_chosen_layer(server, browser, model, run_dir: Path) -> None:
    from selenium.webdriver.common.by import By

    from ademvl.inspect import render

    image, question = data_images(run_dir)[1], "Which shape is it?"
    driver = browser()
    ask(driver, question, image)
    img = load_image(image)
    ids = generated(model, img, question, MAX_NEW)
    looked = where_it_looked(model, img, question, ids)

    def picture():
        src = driver.find_element(By.CSS_SELECTOR, "#looked img").get_attribute("src")
        return np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(src).read())).convert("RGB"))

    assert np.array_equal(picture(), np.asarray(render(img, looked, 1)))  # the default: the middle layer
    driver.find_element(By.CSS_SELECTOR, "#layer input").click()
    driver.find_element(By.CSS_SELECTOR, "#layer li[aria-label='0']").click()
    want = np.asarray(render(img, looked, 0))
    _until(driver, lambda d: np.array_equal(picture(), want))
    save_screenshot(driver, run_dir / "page.png")


def test_example_shows_the_option_probabilities(server, browser, model, run_dir: Path) -> None:
    from selenium.webdriver.common.by import By

    from ademvl.web import examples, option_probabilities

    driver = browser()
    driver.find_element(By.CSS_SELECTOR, '[data-testid="dataset-cell-0-0"]').click()  # the first test problem
    path, prompt = examples(run_dir / "data")[0]
    _until(driver, lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea").get_property("value") == prompt)
    driver.find_element(By.ID, "ask").click()
    assert finished(driver).startswith("Answered")
    want = option_probabilities(model, load_image(path), prompt)
    meters = driver.find_elements(By.CSS_SELECTOR, "#options meter")
    shown = {m.get_attribute("aria-label"): float(m.get_attribute("value")) for m in meters}
    assert sorted(shown) == sorted(want) and len(want) == 5
    assert all(abs(shown[k] - want[k]) < 1e-6 for k in want)
    save_screenshot(driver, run_dir / "example.png", os.environ.get("ADEMVL_SCREENSHOT"))


def test_text_only_question_takes_the_no_image_path(server, browser, model) -> None:
    from selenium.webdriver.common.by import By

    question = "Context: The kite is blue.\nWhat colour is the kite?"
    driver = browser()
    status = ask(driver, question)
    assert "Text-only question" in status
    assert shown_answer(driver) == model.answer([None], [question], max_new_tokens=MAX_NEW, do_sample=False)[0]
    assert not driver.find_elements(By.CSS_SELECTOR, "#looked img")  # no image, no picture


def test_bad_upload_and_empty_question_get_a_message_and_the_server_stays_up(server, browser, model, tmp_path: Path) -> None:
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image\n")
    driver = browser()
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(bad))
    msg = _until(driver, lambda d: d.find_element(By.ID, "status").text or None)
    assert msg.startswith("Error: notes.png: cannot read this image")
    assert ask(driver, "   ").startswith("Error: the question is empty")
    assert server[1].poll() is None
    question = "What colour is the kite?"
    assert ask(driver, question).startswith("Answered")  # the bad file was cleared: a text-only question
    assert shown_answer(driver) == model.answer([None], [question], max_new_tokens=MAX_NEW, do_sample=False)[0]


def test_two_browsers_at_once_both_get_their_answers(server, browser, model, run_dir: Path) -> None:
    image = data_images(run_dir)[2]
    jobs = [(image, "Is the shape on the left or the right?"), (None, "The chair is red. What colour is the chair?")]
    drivers = [browser(0), browser(1)]
    for d, (img, q) in zip(drivers, jobs):
        ask(d, q, img, wait=False)  # both asked before either is answered
    with ThreadPoolExecutor(2) as pool:
        statuses = list(pool.map(finished, drivers))
    assert all(s.startswith("Answered") for s in statuses)
    for d, (img, q) in zip(drivers, jobs):
        pil = None if img is None else load_image(img)
        assert shown_answer(d) == model.answer([pil], [q], max_new_tokens=MAX_NEW, do_sample=False)[0]


def save_screenshot(driver, path: Path, also: str | None = None) -> None:
    """The whole page as PNG under the test's directory; `also` (ADEMVL_SCREENSHOT) gets a small palette copy."""
    import base64

    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {  # beyond the window: the page is taller
        "format": "png", "captureBeyondViewport": True,
        "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}})
    path.write_bytes(base64.b64decode(shot["data"]))
    if also:
        img = Image.open(path).convert("RGB")
        img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(also, optimize=True)

"""The web page in headless Chromium (Debian's /usr/bin/chromium through Playwright): prompt in, images out."""

import base64
import io
import json
import shutil
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium executable (apt-get install -y chromium)", allow_module_level=True)

from PIL import Image  # noqa: E402

import sana  # noqa: E402
from conftest_serve import LiveServer, tiny_pipeline_dir  # noqa: E402
from sana.serve import create_app  # noqa: E402

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def server():
    pipe = sana.Pipeline.from_pretrained(tiny_pipeline_dir(), device="cpu", progress=False)
    with LiveServer(create_app(pipe, max_batch=4, max_wait_ms=0)) as live:
        yield live


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors: {errors}"


def _fill(page, prompt: str, size: int, steps: int, guidance: float, seed: int, n: int) -> None:
    page.fill("#prompt", prompt)
    for field, value in (("width", size), ("height", size), ("steps", steps), ("guidance", guidance)):
        page.fill(f"#{field}", str(value))
    page.fill("#seed", str(seed))
    page.fill("#n", str(n))


def test_page_generates_shows_progress_and_downloads_the_exact_png(server, page, tmp_path):
    page.goto(server.url)
    sync_api.expect(page.locator("#generate")).to_be_enabled(timeout=30_000)
    assert page.input_value("#width") == "512" and page.input_value("#steps") == "20"  # the model's defaults
    _fill(page, "a red fox in the snow", size=64, steps=60, guidance=0, seed=42, n=2)
    page.click("#generate")
    images = page.locator("#gallery figure img")
    sync_api.expect(images).to_have_count(2, timeout=120_000)
    sync_api.expect(page.locator("#status")).to_contain_text("Done", timeout=10_000)
    assert [images.nth(i).evaluate("img => [img.naturalWidth, img.naturalHeight]") for i in range(2)] == [[64, 64]] * 2
    assert sorted(int(images.nth(i).get_attribute("data-seed")) for i in range(2)) == [42, 43]
    log = page.evaluate("window.sanaProgressLog")
    assert any(p["state"] == "running" and 1 <= p["step"] <= 60 and p["steps"] == 60 for p in log), log

    with page.expect_download() as info:
        page.locator("#gallery a.download").first.click()
    download = info.value
    saved = Path(download.path())
    meta = json.loads(Image.open(saved).text["sana"])
    assert meta["prompt"] == "a red fox in the snow" and meta["seed"] in (42, 43) and meta["steps"] == 60
    assert download.suggested_filename == f"sana-{meta['seed']}.png"
    # The same request through the API gives the same PNG bytes: the page keeps them as they came.
    body = {"prompt": "a red fox in the snow", "size": "64x64", "steps": 60, "guidance": 0, "seed": 42, "n": 2}
    answer = httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=120).json()
    api_pngs = {item["seed"]: base64.b64decode(item["b64_json"]) for item in answer["data"]}
    assert saved.read_bytes() == api_pngs[meta["seed"]]
    assert Image.open(io.BytesIO(api_pngs[meta["seed"]])).size == (64, 64)


def test_page_shows_errors_from_the_server(server, page):
    page.goto(server.url)
    sync_api.expect(page.locator("#generate")).to_be_enabled(timeout=30_000)
    page.fill("#prompt", "   ")  # passes the form's `required`, refused by the server
    page.click("#generate")
    status = page.locator("#status")
    sync_api.expect(status).to_contain_text("Error 400: prompt must not be empty", timeout=10_000)
    assert "error" in (status.get_attribute("class") or "")
    sync_api.expect(page.locator("#generate")).to_be_enabled()
    assert page.locator("#gallery figure").count() == 0

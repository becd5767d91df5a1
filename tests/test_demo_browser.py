"""The web demo in a real headless browser: `resclip demo` is started as a server, Chromium (Debian
package) driven by Playwright loads the page, uploads a photo or clicks an example, segments it, sees
the result and its legend, downloads the mask and the JSON, and the page fits a phone's width.

Needs: ``apt-get install -y chromium``, ``pip install playwright gradio`` (no ``playwright install``:
the system Chromium is used). Skipped, with the reason, when any of them is missing. Screenshots at
desktop (1400 x 1000) and phone (420 x 900) width are saved in the test's tmp dir and, if
``RESCLIP_SCREENSHOTS`` (or ``RESCLIP_TEST_ARTIFACTS``) names a folder, copied there for review.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

BIRD = Path(__file__).parent / "data" / "benchmarks" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "crop_114.jpg"
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and os.path.exists(p)), None)
DESKTOP = {"width": 1400, "height": 1000}
PHONE = {"width": 420, "height": 900}

pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="Chromium is not installed (apt-get install -y chromium)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(golden_ckpt_b16: Path, tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("gradio", reason="the demo extra is not installed (pip install 'resclip[demo]')")
    tmp_path = tmp_path_factory.mktemp("demo-server")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "RESCLIP_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "resclip.cli", "demo", "--port", str(port), "--device", "cpu",
           "--pretrained", str(golden_ckpt_b16), "--set", "short_side=160", "--set", "slide_crop=0"]
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log_text = (tmp_path / "server.log").read_text()
                pytest.fail(f"the demo server exited ({proc.returncode}):\n{log_text}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the demo server did not answer:\n{(tmp_path / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _keep_screenshots(tmp_path: Path, names: list[str]) -> None:
    """Copy the screenshots to ``$RESCLIP_SCREENSHOTS`` (or ``$RESCLIP_TEST_ARTIFACTS``) for review."""
    folder = os.environ.get("RESCLIP_SCREENSHOTS") or os.environ.get("RESCLIP_TEST_ARTIFACTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(tmp_path / name, Path(folder) / name)


def _browser(sync_api, pw):
    return pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


def _pick_method(page, title: str) -> None:
    page.click("#method input")
    page.get_by_role("option", name=title, exact=True).click()


def _page_width(page) -> int:
    return int(page.evaluate("document.documentElement.scrollWidth"))


@pytest.mark.slow
def test_demo_page_segments_an_uploaded_photo(server: str, tmp_path: Path):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        browser = _browser(sync_api, pw)
        try:
            page = browser.new_page(viewport=DESKTOP, accept_downloads=True)
            page.goto(server, wait_until="domcontentloaded")
            page.wait_for_selector("#segment-button", timeout=60_000)
            assert "ResCLIP" in page.inner_text("body")
            # the golden checkpoint is a random tiny CLIP: the page says so, in a visible banner
            banner = page.locator("#weights-notice")
            assert banner.is_visible() and "matches no released CLIP" in banner.inner_text()

            # an example: one click fills the image and its classes
            page.click("#examples [data-testid='dataset-cell-0-0']")
            page.wait_for_selector("#input-image img", timeout=30_000)
            assert page.input_value("#classes textarea") == "cat; wall; sofa, cushion"
            assert page.is_disabled("#download-mask") and page.is_disabled("#download-json")
            page.click("#segment-button")
            page.wait_for_selector("#overlay img", timeout=120_000)
            page.wait_for_selector("#legend table", timeout=60_000)
            page.wait_for_selector("#download-json:not([disabled])", timeout=30_000)
            example_status = page.inner_text("#status")
            # the legend once, as page text below the picture: not baked into the overlay, not covered
            assert page.locator("table.resclip-legend").count() == 1
            overlay = page.locator("#overlay img")
            assert overlay.evaluate("img => img.naturalWidth") == 400  # the photo's own width: no legend
            picture, legend_box = overlay.bounding_box(), page.locator("#legend table").bounding_box()
            assert picture and legend_box and legend_box["y"] >= picture["y"] + picture["height"] - 1
            assert "cat" in page.inner_text("#legend")
            page.screenshot(path=str(tmp_path / "demo_desktop_example.png"), full_page=True)

            # the downloads: what `resclip segment` writes
            with page.expect_download() as download:
                page.click("#download-mask")
            assert download.value.suggested_filename == "cat_mask.png"
            download.value.save_as(tmp_path / "cat_mask.png")
            with Image.open(tmp_path / "cat_mask.png") as mask:
                assert mask.mode == "P" and mask.size == (400, 266)
            with page.expect_download() as download:
                page.click("#download-json")
            assert download.value.suggested_filename == "cat.json"
            download.value.save_as(tmp_path / "cat.json")
            record = json.loads((tmp_path / "cat.json").read_text())
            assert record["image"] == "cat.jpg" and record["mask"] == "cat_mask.png"
            assert [c["name"] for c in record["classes"]] == ["cat", "wall", "sofa"]
            assert "/" not in record["settings"]["pretrained"]  # no server path

            # the SFR box follows the base attention
            assert page.is_enabled("#sfr input") and page.is_checked("#sfr input")
            _pick_method(page, "MaskCLIP")
            page.wait_for_function("document.querySelector('#sfr input').disabled", timeout=15_000)
            assert not page.is_checked("#sfr input")
            _pick_method(page, "NACLIP")
            page.wait_for_function("!document.querySelector('#sfr input').disabled", timeout=15_000)
            page.check("#sfr input")

            # an upload
            page.set_input_files("#input-image input[type=file]", str(BIRD))
            page.wait_for_selector("#input-image img", timeout=30_000)
            page.fill("#classes textarea", "bird; water, lake; background")
            page.click("#segment-button")
            page.wait_for_function(
                "document.querySelector('#status') && document.querySelector('#status').innerText"
                ".includes('513x513')", timeout=120_000)
            legend = page.inner_text("#legend")
            status = page.inner_text("#status")
            page.screenshot(path=str(tmp_path / "demo_result.png"), full_page=True)

            page.fill("#classes textarea", "bird; ; water")
            page.click("#segment-button")
            error = page.get_by_text("class 2 is empty").first
            error.wait_for(timeout=30_000)
            assert "--" not in error.inner_text()
            page.screenshot(path=str(tmp_path / "demo_error.png"), full_page=True)
        finally:
            browser.close()
    _keep_screenshots(tmp_path, ["demo_desktop_example.png", "demo_result.png", "demo_error.png"])
    assert example_status.startswith("naclip + RCS + SFR") and "400x266" in example_status
    assert "naclip + RCS + SFR" in status and "513x513" in status
    assert any(name in legend for name in ("bird", "water", "background"))
    assert (tmp_path / "demo_result.png").stat().st_size > 10_000


@pytest.mark.slow
def test_demo_page_fits_a_phone(server: str, tmp_path: Path):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        browser = _browser(sync_api, pw)
        try:
            page = browser.new_page(viewport=PHONE, is_mobile=True, has_touch=True)
            page.goto(server, wait_until="domcontentloaded")
            page.wait_for_selector("#segment-button", timeout=60_000)
            page.wait_for_selector("#examples img", timeout=30_000)
            page.wait_for_timeout(500)  # fonts and images laid out
            empty_width = _page_width(page)
            page.screenshot(path=str(tmp_path / "demo_phone.png"), full_page=True)
            page.click("#examples [data-testid='dataset-cell-1-0']")
            page.wait_for_selector("#input-image img", timeout=30_000)
            # long names without spaces (one of them is in the legend) must wrap, not widen the page
            page.fill("#classes textarea", f"{'espresso_cup_' * 8}; {'wooden_table_' * 8}")
            page.click("#segment-button")
            page.wait_for_selector("#legend table", timeout=120_000)
            page.wait_for_selector("#overlay img", timeout=60_000)
            page.wait_for_timeout(500)
            result_width = _page_width(page)
            # the columns stack: the result comes below the Segment button, the legend below the picture
            button = page.locator("#segment-button").bounding_box()
            picture = page.locator("#overlay img").bounding_box()
            legend_box = page.locator("#legend table").bounding_box()
            assert button and picture and legend_box
            assert picture["y"] > button["y"] and legend_box["y"] >= picture["y"] + picture["height"] - 1
            for box in (picture, legend_box):  # inside the screen, not cut off by a clipping container
                assert box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
            page.screenshot(path=str(tmp_path / "demo_phone_result.png"), full_page=True)
        finally:
            browser.close()
    _keep_screenshots(tmp_path, ["demo_phone.png", "demo_phone_result.png"])
    assert empty_width <= PHONE["width"] and result_width <= PHONE["width"]  # no horizontal scroll

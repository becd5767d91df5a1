"""The web demo in a real headless browser: `resclip demo` is started as a server, Chromium (Debian
package) driven by Playwright loads the page, uploads a photo, segments it and sees the result.

Needs: ``apt-get install -y chromium``, ``pip install playwright gradio`` (no ``playwright install``:
the system Chromium is used). Skipped, with the reason, when any of them is missing. The screenshot
is saved in the test's tmp dir and, if ``RESCLIP_TEST_ARTIFACTS`` names a folder, copied there.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

BIRD = Path(__file__).parent / "data" / "benchmarks" / "VOCdevkit" / "VOC2012" / "JPEGImages" / "crop_114.jpg"
CHROMIUM = next((p for p in (shutil.which("chromium"), "/usr/bin/chromium") if p and os.path.exists(p)), None)

pytestmark = pytest.mark.skipif(CHROMIUM is None,
                                reason="Chromium is not installed (apt-get install -y chromium)")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def server(golden_ckpt_b16: Path, tmp_path: Path):
    pytest.importorskip("gradio", reason="the demo extra is not installed (pip install 'resclip[demo]')")
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


@pytest.mark.slow
def test_demo_page_segments_an_uploaded_photo(server: str, tmp_path: Path):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="Playwright is not installed (pip install playwright)")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(server, wait_until="domcontentloaded")
            page.wait_for_selector("#segment-button", timeout=60_000)
            assert "ResCLIP" in page.inner_text("body")

            page.set_input_files("#input-image input[type=file]", str(BIRD))
            page.wait_for_selector("#input-image img", timeout=30_000)
            page.fill("#classes textarea", "bird; water, lake; background")
            page.click("#segment-button")
            page.wait_for_selector("#overlay img", timeout=120_000)
            page.wait_for_selector("#legend table", timeout=60_000)
            legend = page.inner_text("#legend")
            status = page.inner_text("#status")
            shot = tmp_path / "demo_result.png"
            page.screenshot(path=str(shot), full_page=True)

            page.fill("#classes textarea", "bird; ; water")
            page.click("#segment-button")
            page.get_by_text("class 2 is empty").first.wait_for(timeout=30_000)
            page.screenshot(path=str(tmp_path / "demo_error.png"), full_page=True)
        finally:
            browser.close()
    artifacts = os.environ.get("RESCLIP_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        for name in ("demo_result.png", "demo_error.png"):
            shutil.copy(tmp_path / name, Path(artifacts) / name)
    assert "naclip + RCS + SFR" in status and "513x513" in status
    assert any(name in legend for name in ("bird", "water", "background"))
    assert shot.stat().st_size > 10_000

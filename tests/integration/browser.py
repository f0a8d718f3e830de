"""Load every page of a built book in headless Chromium with no network, and list what a reader would see wrong."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
from pathlib import Path

import pytest

CHROMIUM_FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
MIN_SCALE = 0.8  # a figure shown at less than this fraction of its pixel width has unreadable labels

PAGE_CHECKS = r"""
const done = arguments[arguments.length - 1];
const ready = (window.MathJax && MathJax.startup && MathJax.startup.promise) ? MathJax.startup.promise : Promise.resolve();
ready.then(() => {
  const main = document.querySelector('main') || document.body;
  const prose = main.cloneNode(true);  // the text a reader sees outside code and typeset maths
  prose.querySelectorAll('pre, code, mjx-container, script, style').forEach(e => e.remove());
  const text = prose.textContent;
  const images = [...document.querySelectorAll('main img')].map(img => ({
    src: img.getAttribute('src'), loaded: img.complete && img.naturalWidth > 0,
    natural: img.naturalWidth, shown: img.getBoundingClientRect().width,
    figure: !!img.closest('.cell_output, .output'), alt: img.getAttribute('alt') || ''}));
  done({raw_inline: (text.match(/\\\(/g) || []).length, raw_display: (text.match(/\$\$/g) || []).length,
        raw_commands: [...new Set(text.match(/\\[A-Za-z]{2,}|\$[^$\s][^$]{0,40}\$/g) || [])].slice(0, 5),
        math: document.querySelectorAll('mjx-container').length,
        merror: document.querySelectorAll('mjx-merror, .MathJax_Error').length, images: images,
        overflow: [...document.querySelectorAll('main pre')].filter(p => p.scrollWidth > p.clientWidth + 1).length});
}).catch(e => done({error: String(e)}));
"""


@functools.lru_cache(maxsize=1)
def _tools() -> tuple[str, str]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("browser test skipped: Debian's chromium and chromium-driver are not installed "
                    "(tests/setup.sh installs them as root with apt)")
    pytest.importorskip("selenium", reason="browser test skipped: selenium is not installed (requirements.txt)")
    return chromium, driver


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _browser(chromium: str, driver: str, width: int, profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS + [f"--window-size={width},1000", f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(driver), options=options)
    browser.set_script_timeout(60)
    return browser


def check_pages(html: Path, screenshots: Path, narrow_page: str = "book/01_euler_consistency.html") -> list[str]:
    """Every page at 1280 px (and ``narrow_page`` at 400 px): the problems found, one line each."""
    chromium, driver = _tools()
    shutil.rmtree(screenshots, ignore_errors=True)
    screenshots.mkdir(parents=True)
    pages = sorted(p.relative_to(html).as_posix() for p in html.rglob("*.html") if "_static" not in p.parts)
    server, base = _serve(html)
    problems = []
    try:
        for width, chosen in ((1280, pages), (400, [narrow_page])):
            browser = _browser(chromium, driver, width, screenshots / f".profile{width}")
            try:
                for page in chosen:
                    browser.get(f"{base}/{page}")
                    found = browser.execute_async_script(PAGE_CHECKS)
                    name = page.replace("/", "_").removesuffix(".html")
                    browser.save_screenshot(str(screenshots / f"{name}-{width}px.png"))
                    where = f"{page} at {width} px"
                    if "error" in found:
                        problems.append(f"{where}: {found['error']}")
                        continue
                    if found["raw_inline"] or found["raw_display"]:
                        problems.append(f"{where}: raw TeX in the text ({found['raw_inline']} '\\(', "
                                        f"{found['raw_display']} '$$')")
                    if found["raw_commands"]:
                        problems.append(f"{where}: raw TeX in the text: {found['raw_commands']}")
                    if found["merror"]:
                        problems.append(f"{where}: {found['merror']} MathJax errors")
                    for image in found["images"]:
                        if not image["loaded"]:
                            problems.append(f"{where}: image {image['src']} did not load")
                        if image["figure"] and (not image["alt"] or "_images/" in image["alt"] or image["alt"].endswith(".png")):
                            problems.append(f"{where}: figure {image['src']} has no alt text (cell metadata mystnb.image.alt)")
                        if image["loaded"] and width == 1280 and image["figure"] and image["shown"] < MIN_SCALE * image["natural"]:
                            problems.append(f"{where}: figure {image['src']} shown at "
                                            f"{image['shown'] / image['natural']:.2f} of its width")
                    for entry in browser.get_log("browser"):
                        if entry["level"] == "SEVERE":
                            problems.append(f"{where}: console error: {entry['message'][:300]}")
            finally:
                browser.quit()
    finally:
        server.shutdown()
    return problems

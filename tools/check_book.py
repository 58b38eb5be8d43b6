"""Render every page of the built book in headless Chromium and check what a reader sees.

    python tools/check_book.py [_build/html] [--width 1400] [--screenshots DIR]

The book is served on loopback (as a reader's browser would load it) and each page is
opened at a 1400-px window. A page fails on:

- a code block or an output wider than its box (the reader would have to scroll);
- math left unrendered (MathJax must typeset every formula, offline);
- an image without alt text, an image of a chapter without a caption, or an image
  shrunk to fit (its text would become unreadable);
- a broken internal link (missing page or missing anchor);
- build markers on the page (`#| export`, `# NBVAL_...`);
- an audio player without its label beside it;
- a JavaScript error in the browser's console.

Needs Debian's `chromium` and `chromium-driver` (or CHROME / CHROMEDRIVER set to other
binaries) and the `selenium` package. Exit status 1 lists every failure; 2 if no browser.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urljoin, urlparse

CHROME = os.environ.get("CHROME") or shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver")

# Everything measured in the page, after MathJax has finished.
PAGE_JS = r"""
const done = arguments[arguments.length - 1];
const ready = (window.MathJax && MathJax.startup && MathJax.startup.promise) || Promise.resolve();
ready.then(() => {
  const article = document.querySelector("article") || document.body;
  const text = (e) => (e.innerText || "").split("\n")[0].slice(0, 80);
  const wide = [...article.querySelectorAll("div.cell_input pre, div.cell_output pre, div.highlight pre")]
    .filter((p) => p.scrollWidth > p.clientWidth + 1)
    .map((p) => `${p.closest(".cell_output") ? "output" : "code"} ${p.scrollWidth}px > ${p.clientWidth}px: ${text(p)}`);
  const math = [...article.querySelectorAll(".math")]
    .filter((m) => !m.querySelector("mjx-container") && !m.closest("mjx-container"))
    .map((m) => m.textContent.slice(0, 60));
  const images = [...article.querySelectorAll("img")].map((img) => ({
    src: img.getAttribute("src"), alt: img.getAttribute("alt") || "",
    caption: !!(img.closest("figure") && img.closest("figure").querySelector("figcaption")),
    shown: img.getBoundingClientRect().width, natural: img.naturalWidth,
    cssWidth: parseFloat(img.style.width || img.getAttribute("width") || "0") }));
  const markers = [...article.querySelectorAll("pre")]
    .filter((p) => /^\s*(#\|\s*(export|default_exp)|# NBVAL_)/m.test(p.textContent))
    .map((p) => text(p));
  const players = [...article.querySelectorAll("audio")]
    .filter((a) => !a.closest(".labelled-audio")).length;
  const links = [...document.querySelectorAll("a[href]")].map((a) => a.getAttribute("href"));
  const ids = [...document.querySelectorAll("[id]")].map((e) => e.id);
  done({wide, math, images, markers, players, links, ids, title: document.title});
});
"""


def serve(root: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    """Serve root on a free loopback port, quietly; return the server and its address."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def browser(width: int):
    """A headless Chromium driven by Selenium, logging the console."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROME
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={width},1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    return driver


def image_problems(images: list[dict], chapter: bool) -> list[str]:
    """Images without alt text, chapter images without captions, images shrunk to fit."""
    problems = []
    for img in images:
        name = Path(urlparse(img["src"] or "").path).name
        alt = img["alt"].strip()
        if not alt or alt == img["src"] or re.search(r"\.(png|svg|jpe?g|gif)$", alt) or alt.startswith(("../", "_images/")):
            problems.append(f"image {name}: no alt text (alt={img['alt']!r})")
        if chapter and not img["caption"]:
            problems.append(f"image {name}: no caption")
        intended = img["cssWidth"] or img["natural"]
        if intended and img["shown"] < 0.95 * intended:
            problems.append(f"image {name}: shrunk to {img['shown']:.0f}px of {intended:.0f}px")
    return problems


def link_problems(page_url: str, links: list[str], base: str, root: Path, ids_of) -> list[str]:
    """Internal links whose page or anchor does not exist."""
    problems = []
    for href in links:
        url = urljoin(page_url, href)
        if not url.startswith(base):
            continue
        parsed = urlparse(url)
        rel = unquote(parsed.path[len(urlparse(base).path):]) or "index.html"
        target = root / rel
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            problems.append(f"link {href}: no page {rel}")
        elif parsed.fragment and target.suffix == ".html" and parsed.fragment not in ids_of(target):
            problems.append(f"link {href}: no anchor #{parsed.fragment} in {rel}")
    return problems


@functools.lru_cache(maxsize=None)
def _ids(path: Path) -> frozenset:
    html = path.read_text(errors="replace")
    return frozenset(re.findall(r'\bid="([^"]+)"', html))


def check_page(driver, url: str, rel: str, base: str, root: Path) -> list[str]:
    """Open one page and return its problems."""
    redirect = re.search(r'http-equiv="refresh" content="0; url=([^"]+)"', (root / rel).read_text(), re.I)
    if redirect:  # a redirect page (the book's index.html): its target must exist
        return link_problems(url, [redirect.group(1)], base, root, _ids)
    driver.get(url)
    found = driver.execute_async_script(PAGE_JS)
    time.sleep(0.2)
    problems = [f"too wide: {w}" for w in found["wide"]]
    problems += [f"math not rendered: {m!r}" for m in found["math"]]
    problems += image_problems(found["images"], chapter=rel.startswith("chapters/"))
    problems += [f"build marker on the page: {m}" for m in found["markers"]]
    if found["players"]:
        problems.append(f"{found['players']} audio player(s) without a label beside them")
    problems += link_problems(driver.current_url, found["links"], base, root, _ids)
    for entry in driver.get_log("browser"):
        if entry.get("level") == "SEVERE":
            problems.append(f"JavaScript error: {entry.get('message', '')[:200]}")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="_build/html")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--screenshots", help="save a screenshot of each page's top here")
    args = parser.parse_args(argv)
    root = Path(args.root).resolve()
    if not CHROME or not CHROMEDRIVER:
        print("check-book: no browser: install Debian's chromium and chromium-driver "
              "(apt-get install chromium chromium-driver), or set CHROME and CHROMEDRIVER")
        return 2
    if not (root / "index.html").exists():
        print(f"check-book: no built book in {root}: run `make html` first")
        return 1
    pages = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html")
                   if not p.relative_to(root).as_posix().startswith(("_", "genindex", "search")))
    server, base = serve(root)
    driver = browser(args.width)
    failures = 0
    try:
        for rel in pages:
            problems = check_page(driver, base + rel, rel, base, root)
            if args.screenshots:
                Path(args.screenshots).mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(Path(args.screenshots) / (rel.replace("/", "_") + ".png")))
            failures += len(problems)
            print(f"{'ok  ' if not problems else 'FAIL'} {rel}" + (f" ({len(problems)} problems)" if problems else ""))
            for p in problems:
                print(f"       {p}")
    finally:
        driver.quit()
        server.shutdown()
    print(f"check-book: {len(pages)} pages at {args.width}px, {failures} problems")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

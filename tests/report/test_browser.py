"""The report in a real browser: headless Chromium loads it from file:// with no console error and
every image decoded (read back from the attributes the page's inline script sets on <body>).

Set MONTRAGE_SAVE_SCREENSHOT=1 to also copy the screenshot to docs/report_screenshot.png, and
MONTRAGE_REPORT_HTML=/path/to/report.html to check an existing report (e.g. the demo's) instead of
building one from the tiny run.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium); "
                                                         "the browser check of the HTML report needs it")
REPO = Path(__file__).resolve().parents[2]
SCREENSHOT_COPY = REPO / "docs" / "report_screenshot.png"
WINDOW = (1280, 2000)
TIMEOUT_S = 45
# console output of the page: every message (log, error, CSP violation, uncaught exception) is logged as
# "...:INFO:CONSOLE:<line>] "<message>", source: <url>"; "Uncaught" marks exceptions.
CONSOLE = re.compile(r"(:CONSOLE|ERROR:CONSOLE|Uncaught)")


def chromium(tmp: Path, url: str, *args: str) -> Tuple[str, str]:
    """Run headless Chromium once on ``url``; returns (stdout, stderr)."""
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}", "--enable-logging=stderr",
           "--v=0", *args, url]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"chromium exited {res.returncode}: {res.stderr[-2000:]}"
    return res.stdout, res.stderr


def console_lines(stderr: str) -> List[str]:
    return [ln for ln in stderr.splitlines() if CONSOLE.search(ln)]


class BodyAndImages(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.body: Dict[str, Optional[str]] = {}
        self.n_img = 0

    def handle_starttag(self, tag, attrs):
        if tag == "body":
            self.body = dict(attrs)
        elif tag == "img":
            self.n_img += 1


def parse(text: str) -> BodyAndImages:
    p = BodyAndImages()
    p.feed(text)
    p.close()
    return p


def load(tmp: Path, page: Path) -> Tuple[BodyAndImages, List[str]]:
    """The DOM after load (``--dump-dom``) and the page's console lines."""
    dom, err = chromium(tmp, page.resolve().as_uri(), "--virtual-time-budget=5000", "--dump-dom")
    return parse(dom), console_lines(err)


@pytest.fixture(scope="module")
def report_html(request) -> Path:
    given = os.environ.get("MONTRAGE_REPORT_HTML")
    if given:
        path = Path(given)
        assert path.is_file(), f"MONTRAGE_REPORT_HTML={given} does not exist"
        return path
    return request.getfixturevalue("tiny_report")  # tests/report/conftest.py: the tiny run's final-sim report


def test_report_loads_without_errors(report_html, tmp_path):
    dom, console = load(tmp_path, report_html)
    assert console == [], "console output while loading the report:\n" + "\n".join(console)
    expected = parse(report_html.read_text(encoding="utf-8")).n_img
    assert expected > 0
    assert dom.body.get("data-image-count") == str(expected), dom.body  # the load handler ran over every image
    assert dom.body.get("data-broken-images") == "0", dom.body
    assert dom.body.get("data-images-ok") == "true", dom.body


def test_report_screenshot(report_html, tmp_path):
    from PIL import Image

    shot = tmp_path / "report_screenshot.png"
    _, err = chromium(tmp_path, report_html.resolve().as_uri(), f"--screenshot={shot}",
                      f"--window-size={WINDOW[0]},{WINDOW[1]}")
    assert console_lines(err) == []
    assert shot.is_file()
    with Image.open(shot) as im:
        assert im.size == WINDOW
        gray = im.convert("L")
        lo, hi = gray.getextrema()
        assert hi - lo > 100, "the screenshot is blank"
        assert len(gray.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # text, figures and images
    if os.environ.get("MONTRAGE_SAVE_SCREENSHOT"):
        SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT_COPY)


def test_harness_detects_a_broken_page(tmp_path):
    """Negative control: a missing image, a thrown exception and a blocked request are all caught."""
    from montrage.report.html import _CSP, _SCRIPT

    bad = tmp_path / "bad.html"
    bad.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8">'
                   f'<meta http-equiv="Content-Security-Policy" content="{_CSP}"><script>{_SCRIPT}</script></head>'
                   f'<body><img src="missing.png" alt="gone"><img src="data:image/png;base64,AAAA" alt="bad">'
                   f'<script>notAFunction();</script></body></html>', encoding="utf-8")
    dom, console = load(tmp_path, bad)
    assert dom.body.get("data-images-ok") == "false"
    assert dom.body.get("data-broken-images") == "2"
    assert any("Uncaught" in ln for ln in console), console
    assert any("Content Security Policy" in ln for ln in console), console  # missing.png was blocked

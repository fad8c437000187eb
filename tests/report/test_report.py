"""The static HTML report: self-contained, escaped, and covering every section, on the tiny run."""
from __future__ import annotations

import base64
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from montrage.storage import RunStore
from montrage.storage import schema as S
from tests.report.conftest import REPORT_METHOD as METHOD  # final-sim: final-checkpoint features only

URL_ATTRS = ("src", "href", "srcset", "poster", "data", "action", "formaction", "background", "xlink:href")


class PageParser(HTMLParser):
    """Collects what the tests look at: images, URL-bearing attributes, text, grid rows, cards."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.imgs: List[Dict[str, Optional[str]]] = []
        self.urls: List[Tuple[str, str, str]] = []  # (tag, attr, value)
        self.text: List[str] = []
        self.ckpt_rows: List[str] = []
        self.cards: Dict[str, int] = {}  # data-probe -> training figures inside
        self.tags: List[str] = []
        self.raw_blocks: List[str] = []  # <style>/<script> contents
        self.body_attrs: Dict[str, Optional[str]] = {}
        self._card: Optional[str] = None
        self._card_depth = 0
        self._in_raw = False
        self._divs = 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "body":
            self.body_attrs = a
        for k, v in attrs:
            if k in URL_ATTRS and v is not None:
                self.urls.append((tag, k, v))
        if tag == "img":
            self.imgs.append(a)
        if tag == "tr" and "ckpt-row" in (a.get("class") or "").split():
            self.ckpt_rows.append(a.get("data-step"))
        if tag == "div":
            self._divs += 1
            if "card" in (a.get("class") or "").split():
                self._card, self._card_depth = a.get("data-probe"), self._divs
                self.cards[self._card] = 0
        if tag == "figure" and self._card is not None and "train" in (a.get("class") or "").split():
            self.cards[self._card] += 1
        if tag in ("style", "script"):
            self._in_raw = True

    def handle_endtag(self, tag):
        if tag == "div":
            if self._card is not None and self._divs == self._card_depth:
                self._card = None
            self._divs -= 1
        if tag in ("style", "script"):
            self._in_raw = False

    def handle_data(self, data):
        (self.raw_blocks if self._in_raw else self.text).append(data)

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def parse(path: Path) -> PageParser:
    p = PageParser()
    p.feed(path.read_text(encoding="utf-8"))
    p.close()
    return p


@pytest.fixture(scope="module")
def report(tiny_report) -> Path:
    """build_report(tiny_run, method=METHOD): built once in tests/report/conftest.py (the browser tests load it too)."""
    return tiny_report


@pytest.fixture(scope="module")
def page(report) -> PageParser:
    return parse(report)


def test_report_file_exists(report):
    assert report.is_file() and report.stat().st_size > 1000
    assert report.read_text(encoding="utf-8").lstrip().lower().startswith("<!doctype html>")


def test_no_network_resources(report, page):
    text = report.read_text(encoding="utf-8")
    assert not re.search(r"https?://", text, re.I), "the page must not reference any http(s) resource"
    assert not re.search(r"//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I)  # protocol-relative URLs
    for tag, attr, value in page.urls:
        assert not value.strip().lower().startswith(("http:", "https:", "//")), (tag, attr, value)
    for block in page.raw_blocks:
        assert "@import" not in block and "url(" not in block  # no CSS-loaded resources
    assert "link" not in page.tags, "no external stylesheets, icons or fonts"
    assert "iframe" not in page.tags


def test_every_image_is_embedded_or_beside(report, page):
    assert len(page.imgs) > 20
    for img in page.imgs:
        src = img.get("src") or ""
        if src.startswith("data:"):
            head, _, body = src.partition(",")
            assert head == "data:image/png;base64", head
            assert base64.b64decode(body, validate=True)[:8] == b"\x89PNG\r\n\x1a\n"
        else:
            assert "://" not in src and not src.startswith("/"), src
            assert (report.parent / src).is_file(), f"image {src} missing beside the report"
        assert img.get("alt") is not None


def test_page_content(tiny_run, page):
    store = RunStore.open(tiny_run)
    text = page.all_text
    for prompt in set(store.probe_meta[S.ATTR_PROMPTS]):
        assert prompt in text, prompt
    names = store.train_meta[S.ATTR_FILE_NAMES]
    assert any(n in text for n in names)
    for concept in set(store.concepts):
        assert concept in text
    for needle in ("Run summary", "LoRA", "rank 8", "cost of capture", "package versions", "Training dynamics",
                   "When each concept was learned", "Probe generations across checkpoints", METHOD,
                   str(store.run_config["data_dir"])):
        assert needle in text, needle


def test_checkpoint_grid_rows(tiny_run, page):
    steps = [str(int(s)) for s in RunStore.open(tiny_run).steps]
    assert page.ckpt_rows == steps  # one row per checkpoint, in order


def test_cards_show_top_k(tiny_run, page):
    n_probes = len(RunStore.open(tiny_run).probe_meta[S.ATTR_PROMPTS])
    assert len(page.cards) == n_probes  # the tiny run has 20 probes, under the cap of 40
    assert set(page.cards.values()) == {6}  # default top_k, 8 training images


def test_script_marks_images_on_body(report):
    text = report.read_text(encoding="utf-8")
    assert "dataset.imagesOk" in text and "dataset.brokenImages" in text


def test_escaping_and_precomputed_inputs(tiny_run, tmp_path):
    """Text from the run is escaped; precomputed attribution and compare results are used as given."""
    from montrage.analysis.attribute import attribute
    from montrage.report import build_report

    att = attribute(tiny_run, METHOD, top_k=3, write_store=False, progress=False)
    payload = att.payload
    evil = '<img src=x onerror="alert(1)"> & "quoted"'
    payload["queries"][0]["prompt"] = evil
    steps = [int(s) for s in RunStore.open(tiny_run).steps]
    concepts = sorted(set(RunStore.open(tiny_run).concepts))
    cmp = {"method": METHOD, "steps": steps, "from": steps[0], "to": steps[-1],
           "learned_at": {c: steps[-1] for c in concepts},
           "curves": {c: {"accuracy": [1.0] * len(steps), "own_score": [0.5] * len(steps)} for c in concepts},
           "most_changed": [{"probe": 0, "prompt": "<blink>moved</blink>", "share_change": 1.0, "top_from": "a.png",
                             "top_to": "b.png"}]}
    out = build_report(tiny_run, method=METHOD, out=tmp_path / "r.html", progress=False, top_k=3,
                       attribution=att, compare_result=cmp)
    page = parse(out)
    assert evil in page.all_text  # shown as text ...
    assert all((img.get("src") or "") != "x" for img in page.imgs)  # ... not as an element
    assert "blink" not in page.tags
    assert "<blink>moved</blink>" in page.all_text
    assert "passed in by the caller" in page.all_text
    assert set(page.cards.values()) == {3}


def test_missing_training_images(tiny_run, tmp_path, monkeypatch):
    """Training images unreadable (e.g. a paths-only run whose files are gone): the report still builds and
    lists training images by file name."""
    from montrage.errors import TrainingImagesChangedError
    from montrage.report import build_report

    def gone(self, indices=None):
        raise TrainingImagesChangedError("training image /data/x.png is gone; restore it")

    monkeypatch.setattr(RunStore, "train_images", gone)
    out = build_report(tiny_run, method=METHOD, out=tmp_path / "r.html", progress=False, top_k=2,
                       compare_result={"method": METHOD, "steps": [0], "from": 0, "to": 0, "learned_at": {},
                                       "curves": {}, "most_changed": []})
    page = parse(out)
    assert "shown by file name only" in page.all_text
    names = RunStore.open(tiny_run).train_meta[S.ATTR_FILE_NAMES]
    assert any(n in page.all_text for n in names)
    assert not any((img.get("alt") or "").split(":")[0] in names for img in page.imgs)  # no training thumbnails


def test_no_checkpoint_is_an_error(tmp_path):
    from montrage.errors import StoreError
    from montrage.report import build_report

    with pytest.raises(StoreError):
        build_report(tmp_path / "nothing-here", method=METHOD, progress=False)


def test_the_fused_models_evidence_is_shown_per_query_kind(tiny_run, tmp_path):
    """For the fused model, the report says what the attribution rests on: each channel family's share of the
    weights, per query kind, from the payload's per-query ``channels``; a method without channels shows none."""
    from montrage.analysis.attribute import attribute
    from montrage.report import build_report

    att = attribute(tiny_run, METHOD, top_k=3, write_store=False, progress=False)
    assert "evidence weighed" not in parse(build_report(tiny_run, method=METHOD, out=tmp_path / "plain.html",
                                                        progress=False, attribution=att)).all_text
    for q in att.payload["queries"]:
        q.update(query_kind="prompt", channels={"text/encoder": 0.3, "text/concept": 0.3, "rep/null/sim-final": 0.2,
                                                "grad/dtrak": 0.2})
    text = parse(build_report(tiny_run, method=METHOD, out=tmp_path / "r.html", progress=False,
                              attribution=att)).all_text
    assert "evidence weighed (prompt known) text 60%, rep 20%, grad 20%; largest: text/encoder 30%" in text
    assert "image only" not in text and "channel families" in text
    assert "caption = prompt" not in text and "exact caption first" not in text
    first = att.payload["queries"][0]
    first["exact_caption_first"] = [int(first["top"][0]["train_index"])]
    page = parse(build_report(tiny_run, method=METHOD, out=tmp_path / "exact.html", progress=False, attribution=att))
    n = len(att.payload["queries"])
    assert f"exact caption first 1 of {n} queries carry a training caption" in page.all_text
    assert page.all_text.count("caption = prompt") == 2  # the note names the mark; one image carries it
    assert "the other images' share" not in page.all_text
    first["others_share"] = 0.0  # chosen by the run's retrains: the report says what it means
    page = parse(build_report(tiny_run, method=METHOD, out=tmp_path / "share.html", progress=False, attribution=att))
    assert "the other images' share on those queries the other images' scores are multiplied by 0" in page.all_text
    assert "owes its loss to that caption's image alone" in page.all_text and "why:" not in page.all_text
    first["others_share_why"] = "27 of 32 of the run's generations of its anchors' captions reproduce their image"
    page = parse(build_report(tiny_run, method=METHOD, out=tmp_path / "why.html", progress=False, attribution=att))
    assert "(why: 27 of 32 of the run's generations" in page.all_text
    for q in att.payload["queries"]:  # montrage chose the final checkpoint's channels on held-out anchors: said so
        q.update(channel_set="final", channel_set_why="held-out objective 0.49 with them, 0.50 with every channel")
    page = parse(build_report(tiny_run, method=METHOD, out=tmp_path / "set.html", progress=False, attribution=att))
    assert ("the final checkpoint's channels only, chosen on held-out anchors (held-out objective 0.49 with them"
            in page.all_text)

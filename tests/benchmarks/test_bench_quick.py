"""The attribution benchmark end to end on a drastically reduced configuration (~20 s on one core).

Checks the structure of results.json / BENCHMARKS.md and ground-truth properties that hold for any
run length, not numbers copied from a run.
"""
from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest

from benchmarks.attribution import METRICS, AttributionBenchSettings, run_attribution_bench
from benchmarks.datasets import BenchDataConfig, build_bench_data

TINY = AttributionBenchSettings(
    data=BenchDataConfig(n_artists=2, per_artist=4, mixed_pairs=1, n_prior=8), steps=30, every_n_steps=15,
    probe_steps=5, capture_timesteps=(100, 500), anchors=4, lds_subsets=2, lds_steps=20,
    lds_timesteps=(100, 500, 900), n_bootstrap=200, methods=("pixel", "final-sim", "montrage"))


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "attribution"
    return out, run_attribution_bench(out, settings=TINY, echo=lambda _msg: None)


def test_bench_data_ground_truth_by_construction(tmp_path):
    data = build_bench_data(tmp_path / "d", BenchDataConfig(n_artists=4, per_artist=14, mixed_pairs=2))
    for artist in {r["concept"] for r in data.rows}:
        combos = [(r["colour"], r["object"]) for r in data.rows if r["concept"] == artist]
        assert len(combos) == 14 and len(set(combos)) == 14  # unique (colour, object) within the artist
    captions = {r["text"] for r in data.rows}
    exemplars = [p for p in data.probes if p.kind == "exemplar"]
    assert len(exemplars) == len(data.rows)
    for p in exemplars:
        row = data.rows[p.meta["target_index"]]
        assert p.concept == row["concept"] and p.prompt not in captions  # never the caption verbatim
        assert row["colour"] in p.prompt and row["object"] in p.prompt and row["concept"] in p.prompt
    lines = (data.data_dir / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(ln)["file_name"] for ln in lines] == [r["file_name"] for r in data.rows]
    assert {m.alpha for m in data.mixed} == {0.2, 0.4, 0.6, 0.8}


def test_results_structure(tiny_bench):
    out, res = tiny_bench
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"].keys() == res["methods"].keys()
    labels = set(res["methods"])
    assert {"pixel", "final-sim", "montrage", "montrage (mode A)", "montrage (caption)", "final-sim (caption)"} <= labels
    assert res["lds"]["subsets"] == 2 and "LOWER" in res["lds"]["sign_convention"]
    assert len(list((out / "lds_cache").glob("subset-*/lora_final.safetensors"))) == 2
    for label, r in res["methods"].items():
        assert "error" not in r, (label, r.get("error"))
        figs = r["metrics"]
        for key in ("between_top1", "between_auc", "exemplar_r1", "exemplar_mrr", "lds"):
            f = figs[key]
            assert f["n"] > 0
            lo, hi = f["ci"]
            assert lo - 1e-9 <= f["value"] <= hi + 1e-9, (label, key, f)
            bound = (-1, 1) if key == "lds" else (0, 1)
            assert bound[0] <= lo and hi <= bound[1]
        if r["query_mode"] == "A":  # mode A needs the run's own probes: no mixed / self queries
            assert "self_r1" not in figs and "mixed_spearman" not in figs
        else:
            assert "self_r1" in figs and "mixed_spearman" in figs
        if label != "final-sim":
            assert set(r["diff_vs_reference"]) <= {k for k, _ in METRICS}
    md = (out / "results.md").read_text()
    assert all(label in md for label in labels) and "final-sim" in md


def test_ground_truth_sanity(tiny_bench):
    _, res = tiny_bench
    m = res["methods"]
    # a training image (re-noised) as query: identical pixels -> the pixel baseline ranks it first in its artist
    assert m["pixel"]["metrics"]["self_r1"]["value"] == 1.0
    # with 4 images per artist every target is within the top 5 of its artist
    assert all(r["metrics"]["exemplar_r5"]["value"] == 1.0 for r in m.values())
    # a method compared with itself differs by exactly zero; final-sim is the reference
    assert "diff_vs_reference" not in m["final-sim"]
    d = m["pixel"]["diff_vs_reference"]["exemplar_mrr"]
    assert d["ci"][0] <= d["diff"] <= d["ci"][1]
    assert not any(math.isnan(v) for v in m["pixel"]["metrics"]["self_r1"]["ci"])


def test_rerun_reuses_the_run_and_the_cached_lds_models(tiny_bench, tmp_path):
    out, res = tiny_bench
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    again = run_attribution_bench(copy, settings=dataclasses.replace(TINY, methods=("pixel",)), echo=lambda _m: None)
    assert again["lds"]["reused_from_cache"] == 2
    assert again["data"]["checkpoint_steps"] == res["data"]["checkpoint_steps"]  # the finished run was reused
    assert again["methods"]["pixel"]["metrics"] == res["methods"]["pixel"]["metrics"]  # deterministic


def test_write_md_section_replaces_between_markers(tmp_path):
    from benchmarks.cli import write_md_section

    path = tmp_path / "BENCHMARKS.md"
    write_md_section("attribution", "first", path)
    write_md_section("quality", "q", path)
    write_md_section("attribution", "second", path)
    text = path.read_text()
    assert text.startswith("# ")
    assert text.count("<!-- bench:attribution -->") == 1 and "second" in text and "first" not in text
    assert text.index("<!-- bench:attribution -->") < text.index("<!-- bench:quality -->")

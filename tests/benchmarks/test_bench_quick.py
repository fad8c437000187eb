"""The attribution benchmark end to end on a drastically reduced configuration, and its data by construction.

Checks the structure of results.json / the markdown and ground-truth properties that hold for any run length
(text matching on exact captions, chance without a prompt), not numbers copied from a run.
"""
from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from benchmarks.attribution import (HEADLINE, QUERY_TYPES, AttributionBenchSettings, run_attribution_bench,
                                    summary_markdown, verdicts)
from benchmarks.datasets import BenchDataConfig, build_bench_data

TINY = AttributionBenchSettings(
    data=BenchDataConfig(n_concepts=2, per_concept=4, queries_per_concept=2, composition_seeds=2, mixed_pairs=1,
                         n_prior=8),
    steps=20, every_n_steps=10, probe_steps=4, capture_timesteps=(100, 500), anchors=4, lds_subsets=2,
    lds_timesteps=(100, 500), n_bootstrap=100, methods=("pixel", "final-sim", "text-only"))


@pytest.fixture(scope="module")
def tiny_bench(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "attribution-synthetic-seed0"
    return out, run_attribution_bench(out, settings=TINY, echo=lambda _msg: None)


@pytest.mark.parametrize("dataset", ["synthetic", "typefaces"])
def test_bench_data_ground_truth_by_construction(tmp_path, dataset):
    cfg = BenchDataConfig(dataset=dataset, n_concepts=4, per_concept=5, queries_per_concept=3, composition_seeds=2,
                          mixed_pairs=2, n_prior=4, seed=1)
    data = build_bench_data(tmp_path / "d", cfg)
    trained = {(r["concept"], r["object"]) for r in data.rows}
    assert len(data.heldout) == 4 and not set(data.heldout) & trained  # held-out pairs never trained
    captions = [r["text"] for r in data.rows]
    assert len(set(captions)) == len(captions)  # one image per caption: exemplar ground truth is unique
    for p in data.caption_queries:
        assert p.prompt == captions[p.meta["target_index"]] and p.concept == data.rows[p.meta["target_index"]]["concept"]
    assert {(p.concept, p.meta["object"]) for p in data.composition_queries} == set(data.heldout)
    for p in data.composition_queries:
        assert p.prompt not in captions and p.concept in p.prompt and p.meta["object"] in p.prompt.split()[-3:] + p.prompt.split()[:3]
    from PIL import Image

    train = np.stack([np.asarray(Image.open(data.data_dir / r["file_name"]).convert("RGB")) for r in data.rows])
    for img, t in zip(data.copy_images, data.copy_targets):  # a near copy: closest to its own source
        d = np.abs(train.astype(int) - img.astype(int)).mean(axis=(1, 2, 3))
        assert 0 < d[t] < 0.5 * np.median(d)
    for img, c, o in zip(data.unseen_images, data.unseen_concepts, data.unseen_objects):
        assert (c, o) not in trained and not any(np.array_equal(img, t) for t in train)
    lines = (data.data_dir / "metadata.jsonl").read_text().splitlines()
    assert [json.loads(ln)["file_name"] for ln in lines] == [r["file_name"] for r in data.rows]
    again = build_bench_data(tmp_path / "again", cfg)  # a pure function of the config
    np.testing.assert_array_equal(again.copy_images, data.copy_images)
    assert [p.prompt for p in again.caption_queries] == [p.prompt for p in data.caption_queries]


@pytest.mark.parametrize("dataset", ["synthetic", "typefaces"])
def test_query_counts_leave_the_training_data_as_it_is(tmp_path, dataset):
    """More queries per type must not change the training images (or prior set): a cached run stays valid."""
    from montrage.data.imagefolder import load_imagefolder

    few = BenchDataConfig(dataset=dataset, n_concepts=3, per_concept=4, queries_per_concept=1, composition_seeds=1,
                          mixed_pairs=1, n_prior=4, seed=2)
    many = dataclasses.replace(few, queries_per_concept=3, composition_seeds=2, mixed_pairs=2)
    a, b = build_bench_data(tmp_path / "few", few), build_bench_data(tmp_path / "many", many)
    assert few.training_fields() == many.training_fields()
    assert len(b.unseen_images) == 3 * len(a.unseen_images) and len(b.caption_queries) == 3 * len(a.caption_queries)
    assert len(b.composition_queries) == 2 * len(a.composition_queries)
    assert load_imagefolder(a.data_dir, 16).fingerprint() == load_imagefolder(b.data_dir, 16).fingerprint()
    if a.prior_dir is not None:
        assert load_imagefolder(a.prior_dir, 16).fingerprint() == load_imagefolder(b.prior_dir, 16).fingerprint()
    other = build_bench_data(tmp_path / "other", dataclasses.replace(few, seed=3))
    assert load_imagefolder(other.data_dir, 16).fingerprint() != load_imagefolder(a.data_dir, 16).fingerprint()


@pytest.mark.slow  # ~1.5 min on an idle core (a monitored run, 2 LDS retrains, 3 methods on 6 query types)
def test_results_structure_and_ground_truth(tiny_bench):
    out, res = tiny_bench
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"].keys() == res["methods"].keys() == {"pixel", "final-sim", "text-only"}
    assert set(res["queries"]) == set(QUERY_TYPES)
    assert res["lds"]["subsets"] == 2 and len(list((out / "lds_cache").glob("subset-*/lora_final.safetensors"))) == 2
    for label, r in res["methods"].items():
        assert "error" not in r, (label, r.get("error"))
        for qtype, figs in r["metrics"].items():
            for key, f in figs.items():
                if f["value"] is None:
                    continue
                lo, hi = f["ci"]
                assert lo - 1e-9 <= f["value"] <= hi + 1e-9, (label, qtype, key, f)
    text = res["methods"]["text-only"]["metrics"]
    # an exact caption as prompt: text matching alone finds its image and its concept
    assert text["caption"]["exemplar_r1"]["value"] == 1.0 and text["caption"]["between_top1"]["value"] == 1.0
    # without a prompt it has nothing: constant scores, pessimistic ranks, chance concept (2 balanced concepts)
    assert text["image"]["exemplar_r1"]["value"] == 0.0 and text["copy"]["copy_r1"]["value"] == 0.0
    assert text["image"]["between_top1"]["value"] == 0.5 and text["unseen"]["between_top1"]["value"] == 0.5
    # a perturbed copy is nearest its source in pixels
    assert res["methods"]["pixel"]["metrics"]["copy"]["copy_r1"]["value"] == 1.0
    md = (out / "results.md").read_text()
    assert all(q in md for q in QUERY_TYPES) and "text-only" in md


@pytest.mark.slow
def test_rescore_reuses_run_queries_and_lds_models(tiny_bench, tmp_path):
    out, res = tiny_bench
    copy = tmp_path / "again"
    shutil.copytree(out, copy)
    again = run_attribution_bench(copy, settings=dataclasses.replace(TINY, methods=("pixel",)), echo=lambda _m: None)
    assert again["lds"]["reused_from_cache"] == 2
    assert again["data"]["checkpoint_steps"] == res["data"]["checkpoint_steps"]
    assert again["methods"]["pixel"]["metrics"] == res["methods"]["pixel"]["metrics"]  # deterministic
    assert again["timings_s"]["train_monitored"] < res["timings_s"]["train_monitored"]
    # re-scoring one method reuses the saved scores of the others (same queries)
    third = run_attribution_bench(copy, settings=dataclasses.replace(TINY, methods=("pixel", "text-only")),
                                  rescore=["text-only"], echo=lambda _m: None)
    assert third["reused_scores"] == ["pixel"]
    assert third["methods"]["text-only"]["metrics"] == res["methods"]["text-only"]["metrics"]


@pytest.mark.slow
def test_more_queries_reuse_the_run_and_its_lds_retrains_but_other_data_is_refused(tiny_bench, tmp_path):
    out, res = tiny_bench
    copy = tmp_path / "more"
    shutil.copytree(out, copy)
    more = dataclasses.replace(TINY, data=dataclasses.replace(TINY.data, queries_per_concept=3), methods=("pixel",))
    again = run_attribution_bench(copy, settings=more, echo=lambda _m: None)
    assert again["lds"]["reused_from_cache"] == 2 and again["queries"]["caption"] == 3 * 2
    assert again["timings_s"]["train_monitored"] < res["timings_s"]["train_monitored"]
    other = dataclasses.replace(TINY, data=dataclasses.replace(TINY.data, seed=5), methods=("pixel",))
    with pytest.raises(RuntimeError, match="other data"):
        run_attribution_bench(copy, settings=other, echo=lambda _m: None)


def _results(values, diffs):
    """A hand-made results dict: montrage vs one other method on one metric."""
    fig = lambda v: {"value": v, "ci": [v - 0.05, v + 0.05], "n": 40}  # noqa: E731
    return {"methods": {
        "montrage": {"metrics": {"caption": {"exemplar_r1": fig(values[0])}},
                     "diff_vs": {"other": {"caption": {"exemplar_r1": {"diff": diffs[0], "ci": list(diffs[1:])}}}}},
        "other": {"metrics": {"caption": {"exemplar_r1": fig(values[1])}}}}}


@pytest.mark.parametrize("values,diff,tied,met", [
    ((0.90, 0.80), (0.10, 0.02, 0.18), True, True),      # best, target met
    ((0.80, 0.81), (-0.01, -0.06, 0.04), True, False),   # tied (interval has 0, point >= -0.02), target missed
    ((0.70, 0.75), (-0.05, -0.12, 0.01), False, False),  # interval has 0 but point < -0.02: not tied
    ((0.86, 0.90), (-0.015, -0.03, -0.001), False, True),  # interval below 0: loses
])
def test_verdict_rule(values, diff, tied, met):
    rows = verdicts(_results(values, diff))
    row = next(r for r in rows if r["metric"] == "exemplar_r1")
    assert row["best_or_tied"] is tied and row["target_met"] is met
    assert row["target_gap"] == pytest.approx(values[0] - 0.85)
    res = {"dataset": "synthetic", "seed": 0, "verdicts": rows, "methods": {}}
    table = summary_markdown([res])
    assert ("; ok" in table) is tied and len(table.splitlines()) >= len(HEADLINE)


def test_a_training_variant_gets_its_own_folder_and_stays_out_of_the_summary(tmp_path, capsys):
    """`--train-steps/--rank/--lr/--lds-subsets` make a variant: 5 checkpoints still, a folder and section named by
    what differs, and the default benchmark's summary never reads it."""
    from benchmarks.attribution import collect_results, run_dir_for, settings_for, variant_tag
    from benchmarks.cli import build_parser, command_line

    base = settings_for("typefaces", 0)
    assert variant_tag(base, "typefaces", 0, False) == ""
    long = settings_for("typefaces", 0, variant={"steps": 600, "rank": 8, "lr": 0.005, "lds_subsets": 8})
    assert (long.steps, long.every_n_steps, long.rank, long.lr, long.lds_subsets) == (600, 150, 8, 0.005, 8)
    assert long.data == base.data and long.capture_timesteps == base.capture_timesteps
    tag = variant_tag(long, "typefaces", 0, False)
    assert tag == "-steps600-rank8-lr0.005-lds8"
    assert variant_tag(settings_for("typefaces", 0, variant={"rank": base.rank}), "typefaces", 0, False) == ""
    assert run_dir_for(tmp_path, "typefaces", 0, False, tag).name == "attribution-typefaces-seed0" + tag
    with pytest.raises(ValueError, match="unknown variant"):
        settings_for("typefaces", 0, variant={"batch": 4})
    for folder, s in (("attribution-typefaces-seed0", base), ("attribution-typefaces-seed0" + tag, long)):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "results.json").write_text(json.dumps(
            {"benchmark": "attribution", "dataset": "typefaces", "seed": 0, "quick": False,
             "settings": dataclasses.asdict(s) | {"data": {}}}))
    (tmp_path / "attribution-typefaces-seed0-again").symlink_to(tmp_path / "attribution-typefaces-seed0")
    assert [r["settings"]["steps"] for r in collect_results(tmp_path, False)] == [base.steps]  # once, not twice
    args = build_parser().parse_args(["attribution", "--dataset", "typefaces", "--train-steps", "600", "--rank", "8",
                                      "--lr", "0.005", "--lds-subsets", "8"])
    assert "--train-steps 600 --rank 8 --lr 0.005 --lds-subsets 8" in command_line(args)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["attribution", "--train-steps", "0"])
    assert "expected a positive int" in capsys.readouterr().err


def test_the_section_says_what_the_fit_decided_from_its_retrains():
    """With counterfactual targets the set-up line states the fit's own decisions (term adopted, the other images'
    share on an exact-caption query and the LDS by share on the targets); without them, that it had none."""
    from benchmarks.attribution import _fit_decisions, _fit_label

    assert _fit_decisions({"n": 8}) == ""
    line = _fit_decisions({"n": 8, "counterfactual_adopted": False, "counterfactual_why": "held-out LDS +0.010",
                           "others_share": 0.0, "share_why": "share 0 of the other images",
                           "lds_by_share": {"1.0": 0.41, "0.0": 0.62}})
    assert "did not adopt the counterfactual term (held-out LDS +0.010)" in line
    assert "exact-caption query: 0 (share 0" in line and "1.0: 0.410, 0.0: 0.620" in line
    assert "memorisation" not in line  # not measured: nothing said
    line = _fit_decisions({"n": 8, "others_share": 0.0, "share_why": "share 0", "memorised": [3, 32],
                           "memorised_share": 1.0})
    assert "without retrains the memorisation test would choose 1 (3 of 32 generations" in line
    # the default fit: no term, the share the run's memorisation test chose
    line = _fit_decisions({"n": 0, "others_share": 0.0, "share_why": "27 of 32 reproduce; share 0",
                           "memorised": [27, 32], "memorised_share": 0.0})
    assert "counterfactual term" not in line and "exact-caption query: 0 (27 of 32 reproduce" in line
    assert _fit_label({"n": 0, "others_share": 0.0}).startswith("the default fit (no retrains), the other images' share")
    # the channel set chosen per query kind is stated in both
    sets = {"prompt": {"chosen": "final", "why": "held-out objective 0.49 vs 0.50"}, "image": {"chosen": "all", "why": "x"}}
    line = _fit_decisions({"n": 0, "channel_sets": sets})
    assert "prompt queries: the final checkpoint's channels (held-out objective 0.49 vs 0.50)" in line
    assert "image queries: every channel (x)" in line
    assert _fit_label({"n": 8, "channel_sets": sets}).endswith("; channels prompt: final checkpoint, image: all")

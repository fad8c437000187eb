"""The command line: help texts, inspect, attribute (every method, one JSON contract), compare."""
import json

import pytest
from PIL import Image

from montrage.analysis.base import available
from montrage.cli import build_parser, main

SUBCOMMANDS = ["train", "demo", "inspect", "attribute", "compare", "report", "bench"]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for sub in SUBCOMMANDS:
        assert sub in out


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_has_help_for_every_option(sub, capsys):
    with pytest.raises(SystemExit):
        main([sub, "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: montrage " + sub)
    parser = build_parser()
    subparser = parser._subparsers._group_actions[0].choices[sub]
    for action in subparser._actions:
        if action.dest != "help":
            assert action.help, f"{sub} {action.option_strings or action.dest} has no help"


def test_readme_mentions_every_subcommand_and_train_option():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    for sub in SUBCOMMANDS:
        assert f"montrage {sub}" in readme
    for opt in ["--data", "--output", "--base", "--resolution", "--steps", "--batch-size", "--lr", "--rank",
                "--checkpoint-every", "--probes", "--seed", "--no-monitor"]:
        assert opt in readme, opt


def test_inspect(tiny_run, capsys):
    assert main(["inspect", str(tiny_run)]) == 0
    out = capsys.readouterr().out
    assert "checkpoints    3 at steps [0, 3, 6]" in out
    assert "artist-0=4" in out and "artist-1=4" in out
    assert main(["inspect", str(tiny_run), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["train_images"] == 8 and data["checkpoints"] == 3


def _check_contract(payload, method, n_train):
    assert set(payload) >= {"run", "method", "checkpoint", "queries", "score_path"}
    assert payload["method"] == method and payload["checkpoint"] == 6
    for q in payload["queries"]:
        assert set(q) >= {"id", "prompt", "seed", "image", "concept_scores", "predicted_concept", "top"}
        assert set(q["concept_scores"]) == {"artist-0", "artist-1"}
        assert q["predicted_concept"] in q["concept_scores"]
        assert 1 <= len(q["top"]) <= min(3, n_train)
        scores = [t["score"] for t in q["top"]]
        assert scores == sorted(scores, reverse=True)
        for t in q["top"]:
            assert set(t) == {"train_index", "file_name", "concept", "score"}
            assert t["file_name"] == f"{t['concept']}_{t['train_index'] % 4:03d}.png"


@pytest.mark.parametrize("method", [m for m in available() if m != "concept-trak"])
def test_every_method_writes_the_same_contract(method, tiny_run_copy, tmp_path):
    out = tmp_path / f"{method}.json"
    assert main(["--quiet", "attribute", str(tiny_run_copy), "--method", method, "--top-k", "3",
                 "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    _check_contract(payload, method, 8)
    from montrage.storage import RunStore

    scores, ids = RunStore.open(tiny_run_copy).read_attribution(method, 6)
    assert scores.shape == (len(payload["queries"]), 8)
    assert ids == [q["id"] for q in payload["queries"]]


def test_concept_trak_contract(tiny_run_copy, tmp_path):
    out = tmp_path / "ct.json"
    assert main(["--quiet", "attribute", str(tiny_run_copy), "--method", "concept-trak", "--concept", "by artist-0",
                 "--top-k", "3", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    _check_contract(payload, "concept-trak", 8)
    assert payload["concept"] == "by artist-0"


def test_attribute_query_images(tiny_run_copy, tiny_data, tmp_path, capsys):
    """A folder of arbitrary images: a training image itself must be attributed to itself."""
    q = tmp_path / "queries"
    q.mkdir()
    Image.open(tiny_data / "artist-1_002.png").save(q / "copy.png")
    out = tmp_path / "q.json"
    assert main(["--quiet", "attribute", str(tiny_run_copy), "--method", "final-sim", "--images", str(q),
                 "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [x["id"] for x in payload["queries"]] == ["copy.png"]
    assert payload["queries"][0]["top"][0]["file_name"] == "artist-1_002.png"
    assert payload["queries"][0]["predicted_concept"] == "artist-1"


def test_attribute_unknown_checkpoint_is_a_clear_error(tiny_run, capsys):
    assert main(["attribute", str(tiny_run), "--checkpoint", "5"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint at step 5" in err and "[0, 3, 6]" in err


def test_attribute_unknown_method(tiny_run, capsys):
    assert main(["attribute", str(tiny_run), "--method", "nope"]) == 2
    assert "unknown attribution method 'nope'" in capsys.readouterr().err


def test_compare_writes_json_and_plot(tiny_run_copy, tmp_path, capsys):
    out, plot = tmp_path / "c.json", tmp_path / "c.png"
    assert main(["--quiet", "compare", str(tiny_run_copy), "--method", "final-sim", "--out", str(out),
                 "--plot", str(plot)]) == 0
    data = json.loads(out.read_text())
    assert data["steps"] == [0, 3, 6]
    assert set(data["learned_at"]) == {"artist-0", "artist-1"}
    for c in data["curves"].values():
        assert len(c["accuracy"]) == 3 and all(0 <= a <= 1 for a in c["accuracy"])
    assert plot.stat().st_size > 1000 and Image.open(plot).format == "PNG"


def test_fit_says_when_more_retrains_can_resolve_the_counterfactual_gain():
    """A positive held-out gain under the adoption bar is reported as unresolved, with the retrains that can resolve
    it; an adopted term, a loss, or an unmeasured one gets no such advice."""
    from montrage.cli import counterfactual_line

    base = {"retrains": 8, "heldout": "2-fold over the retrained subsets"}
    unresolved = counterfactual_line({**base, "heldout_lds_with": 0.61, "heldout_lds_without": 0.563,
                                      "heldout_gain_se": 0.047, "adopted": False})
    assert "not adopted" in unresolved and "+0.047 is under the bar" in unresolved
    assert "--retrains 16" in unresolved
    adopted = counterfactual_line({**base, "heldout_lds_with": 0.7, "heldout_lds_without": 0.6,
                                   "heldout_gain_se": 0.02, "adopted": True})
    lost = counterfactual_line({**base, "heldout_lds_with": 0.5, "heldout_lds_without": 0.6,
                                "heldout_gain_se": 0.02, "adopted": False})
    unmeasured = counterfactual_line({"retrains": 2, "heldout": "needs 4+ retrained subsets (2 to fit, 2 to score)"})
    assert adopted.endswith("adopted") and "--retrains" not in adopted
    assert lost.endswith("not adopted") and "--retrains" not in lost
    assert unmeasured == ("counterfactual term (2 retrains): not adopted, held-out LDS not measured: needs 4+ "
                          "retrained subsets (2 to fit, 2 to score)")

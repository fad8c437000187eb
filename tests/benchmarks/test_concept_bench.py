import numpy as np

from benchmarks.concept import compositional_queries, precision_at_k, precision_ceiling
from montrage.storage import schema as S


def test_precision_at_k_hand_case():
    scores = np.array([[0.9, 0.8, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4]])
    relevant = np.array([[True, False, False, True], [True, True, False, False]])
    np.testing.assert_allclose(precision_at_k(scores, relevant, k=2), [0.5, 0.0])
    np.testing.assert_allclose(precision_at_k(scores, relevant, k=4), [0.5, 0.5])


def test_precision_ceiling_is_what_a_perfect_ranking_reaches():
    """8 images per artist cap P@10 at 0.80: the ceiling is reported next to the artist target."""
    relevant = np.zeros((3, 64), bool)
    relevant[0, :8] = relevant[1, 8:16] = True
    relevant[2, :12] = True
    assert precision_ceiling(relevant) == (0.8 + 0.8 + 1.0) / 3
    perfect = relevant.astype(float)  # a perfect ranking scores the relevant images highest
    assert precision_at_k(perfect, relevant).mean() == precision_ceiling(relevant)


class _FakeStore:
    def __init__(self, rows):
        self.train_meta = {S.ATTR_EXTRA: [{"colour": c, "object": o} for c, o, _ in rows],
                           S.ATTR_CONCEPTS: [a for _, _, a in rows]}


def test_in_distribution_triples_are_captions_and_ood_ones_never_are():
    rows = [("red", "circle", "artist-0"), ("blue", "square", "artist-0"), ("red", "square", "artist-1"),
            ("blue", "circle", "artist-1")]
    splits = compositional_queries(_FakeStore(rows), n_per_split=4, seed=0)
    seen = set(rows)
    assert {(q["colour"], q["object"], q["artist"]) for q in splits["ID"]} == seen
    assert len(splits["OOD"]) == 4
    assert all((q["colour"], q["object"], q["artist"]) not in seen for q in splits["OOD"])
    assert all(q["prompt"] == f"a {q['colour']} {q['object']} by {q['artist']}" for q in splits["ID"] + splits["OOD"])


def test_a_concept_run_with_more_images_per_artist_keeps_the_passes_per_image(tmp_path, monkeypatch):
    """`bench concept --per-concept N` trains the attribution benchmark's run with N images per artist (so a
    perfect ranking can reach artist P@10 1.0), with the same passes over each image and 5 checkpoints."""
    import json
    from collections import Counter
    from types import SimpleNamespace

    import montrage.training as T
    from benchmarks.attribution import settings_for
    from benchmarks.concept import concept_run, run_concept

    calls = []
    monkeypatch.setattr(T, "train", lambda data, run, **kw: calls.append((data, run, kw)))
    run = concept_run(tmp_path, "synthetic", 0, 6, quick=True)
    base = settings_for("synthetic", 0, quick=True)
    (data, got_run, kw), = calls
    assert got_run == run and kw["monitor"]
    cfg = kw["cfg"]
    assert cfg.steps == base.steps * 6 // base.data.per_concept and kw["capture"].every_n_steps == cfg.steps // 4
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    assert set(Counter(r["concept"] for r in rows).values()) == {6}
    args = SimpleNamespace(dataset="synthetic", seed=0, per_concept=1, run=None, out=str(tmp_path), quick=True,
                           write_md=None)
    assert run_concept(args) == 2
    args.per_concept, args.run = 6, str(run)
    assert run_concept(args) == 2  # --per-concept builds its own run: not with --run


def test_typeface_sets_with_more_characters_keep_the_default_ones(tmp_path):
    """`--per-concept` above 8 on typefaces adds characters that are neither default nor unseen-image ones; the
    default set (the attribution benchmark's) is unchanged."""
    from collections import Counter

    from benchmarks.datasets import MORE_CHARACTERS, BenchDataConfig, build_bench_data
    from montrage.data import typefaces as T

    assert not set(MORE_CHARACTERS) & (set(T.UNSEEN_CHARACTERS) | set(T.DEFAULT_CHARACTERS))
    small = build_bench_data(tmp_path / "a", BenchDataConfig(dataset="typefaces", n_concepts=2, per_concept=8))
    large = build_bench_data(tmp_path / "b", BenchDataConfig(dataset="typefaces", n_concepts=2, per_concept=11))
    assert {r["object"] for r in small.rows} <= set(T.DEFAULT_CHARACTERS)
    assert set(Counter(r["concept"] for r in large.rows).values()) == {10}  # one character per face held out
    assert {r["object"] for r in large.rows} - set(T.DEFAULT_CHARACTERS) <= set(MORE_CHARACTERS[:3])

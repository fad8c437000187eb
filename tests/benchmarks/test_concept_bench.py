import numpy as np

from benchmarks.concept import compositional_queries, precision_at_k
from montrage.storage import schema as S


def test_precision_at_k_hand_case():
    scores = np.array([[0.9, 0.8, 0.1, 0.7], [0.1, 0.2, 0.3, 0.4]])
    relevant = np.array([[True, False, False, True], [True, True, False, False]])
    np.testing.assert_allclose(precision_at_k(scores, relevant, k=2), [0.5, 0.0])
    np.testing.assert_allclose(precision_at_k(scores, relevant, k=4), [0.5, 0.5])


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

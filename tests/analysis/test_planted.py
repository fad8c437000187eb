"""Scorers on a store with planted structure: the right answer is known by construction."""
import numpy as np
import pytest

from montrage.analysis.attribute import attribute, concept_scores
from montrage.analysis.base import available
from montrage.analysis.queries import probe_queries
from montrage.storage import RunStore
from tests.analysis.planted import make_planted_store


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    path = tmp_path_factory.mktemp("planted") / "run"
    targets, concepts = make_planted_store(path)
    return path, targets, concepts


def _score(path, method):
    st = RunStore.open(path)
    res = attribute(path, method, queries=probe_queries(st), options={"query_mode": "A"}, write_store=False,
                    progress=False, store=st)
    return res.scores


def _recall_at_1(scores, targets):
    return float(np.mean(scores.argmax(1) == targets))


def test_dynamics_find_the_source_where_final_similarity_cannot(planted):
    path, targets, _ = planted
    dyn = _recall_at_1(_score(path, "dynamics-only"), targets)
    final = _recall_at_1(_score(path, "final-sim"), targets)
    assert dyn >= 0.9, dyn
    assert final <= 0.5, final  # the static part dominates the final representation
    assert dyn > final


def test_learned_model_uses_the_informative_channels(planted):
    path, targets, _ = planted
    learned = _recall_at_1(_score(path, "montrage"), targets)
    uniform = _recall_at_1(_score(path, "montrage-unsupervised"), targets)
    assert learned >= 0.9, learned
    assert learned >= uniform


def test_between_concept_from_dynamics(planted):
    path, targets, concepts = planted
    scores = _score(path, "montrage")
    per = concept_scores(scores, concepts)
    names = sorted(per)
    pred = [names[int(np.argmax([per[c][q] for c in names]))] for q in range(len(targets))]
    assert np.mean([p == concepts[t] for p, t in zip(pred, targets)]) >= 0.9


def test_every_registered_dynamics_scorer_runs_on_the_same_store(planted):
    path, targets, _ = planted
    for method in ["montrage", "montrage-unsupervised", "final-sim", "final-sim-learned", "dynamics-only",
                   "loss-codescent"]:
        assert method in available()
        s = _score(path, method)
        assert s.shape == (len(targets), len(targets))
        assert np.isfinite(s).all()
        assert (s >= 0).all() and (s <= 1).all()

"""The quality gate's pieces that run fast: dataset settings and the typeface judge."""
import numpy as np
import pytest

from benchmarks.classifier import train_typeface_classifier
from benchmarks.quality import TYPEFACES, settings_for
from montrage.data import typefaces as TF


def test_settings_leave_training_to_montrage_defaults():
    s = settings_for("typefaces")
    assert s is TYPEFACES and (s.steps, s.lr, s.rank) == (None, None, None) and s.prior_fraction == 0.0
    assert settings_for("synthetic").steps is None  # the gate checks the defaults, not a hand-set 400
    assert settings_for("typefaces", seed=3).train_seed == 3
    with pytest.raises(ValueError, match="unknown dataset"):
        settings_for("fonts")


@pytest.mark.slow  # ~25 s on an idle core
def test_typeface_judge_recognises_fresh_renders_of_face_and_character():
    faces, chars = list(TF.DEFAULT_FACES[:2]), list(TF.DEFAULT_CHARACTERS[:3])
    judge = train_typeface_classifier(faces, chars, steps=120, per_pair=12, seed=0)
    imgs, recs = TF.render_pairs([(f, c) for f in faces for c in chars], per_pair=4, seed=99)  # unseen jitter
    pc, pf = judge.predict(imgs)
    assert np.mean([faces[p] == r.concept for p, r in zip(pf, recs)]) >= 0.9
    assert np.mean([chars[p] == r.object for p, r in zip(pc, recs)]) >= 0.9

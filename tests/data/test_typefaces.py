import itertools

import numpy as np
import pytest

from montrage.data import typefaces as T
from montrage.data.imagefolder import load_imagefolder
from montrage.errors import ConfigError


def _norm(a: np.ndarray) -> np.ndarray:
    """Grey, min-max per image: compares glyph shapes, not the paper/ink tone jitter."""
    g = a.astype(np.float64).mean(-1).reshape(len(a), -1)
    lo, hi = g.min(1, keepdims=True), g.max(1, keepdims=True)
    return (g - lo) / (hi - lo)


def test_folder_is_deterministic_and_seeded(tmp_path):
    a = T.write_typeface_folder(tmp_path / "a", faces=T.DEFAULT_FACES[:3], characters=("a", "g"), per_pair=2, seed=3)
    b = T.write_typeface_folder(tmp_path / "b", faces=T.DEFAULT_FACES[:3], characters=("a", "g"), per_pair=2, seed=3)
    c = T.write_typeface_folder(tmp_path / "c", faces=T.DEFAULT_FACES[:3], characters=("a", "g"), per_pair=2, seed=4)
    sa, sb, sc = (load_imagefolder(p, 16) for p in (a, b, c))
    assert (a / "metadata.jsonl").read_text() == (b / "metadata.jsonl").read_text()
    np.testing.assert_array_equal(sa.images, sb.images)
    assert np.abs(sa.images.astype(int) - sc.images.astype(int)).mean() > 5  # another seed, other jitter


def test_imagefolder_loads_with_captions_concepts_objects(tmp_path):
    root = T.write_typeface_folder(tmp_path / "tf", resolution=32)
    ts = load_imagefolder(root, 32)
    assert len(ts) == len(T.DEFAULT_FACES) * len(T.DEFAULT_CHARACTERS) == 64
    assert ts.images.shape == (64, 32, 32, 3) and ts.images.dtype == np.uint8
    assert sorted(set(ts.concepts)) == sorted(T.DEFAULT_FACES)
    assert ts.captions[0] == T.caption(ts.concepts[0], ts.extra[0]["object"])
    assert {e["object"] for e in ts.extra} == set(T.DEFAULT_CHARACTERS)
    assert not ts.converted  # written at the size it is read


def test_copies_differ_and_faces_differ_more_than_copies():
    faces, chars, k = T.DEFAULT_FACES, T.DEFAULT_CHARACTERS, 4
    imgs, _ = T.render_pairs([(f, c) for f in faces for c in chars], per_pair=k, seed=0)
    x = _norm(imgs).reshape(len(faces), len(chars), k, -1)
    within = [np.mean([np.abs(x[f, c, i] - x[f, c, j]).mean() for c in range(len(chars))
                       for i, j in itertools.combinations(range(k), 2)]) for f in range(len(faces))]
    assert min(within) > 0.02  # the jitter is real: no two copies are the same image
    for f, g in itertools.combinations(range(len(faces)), 2):
        between = np.mean([np.abs(x[f, c, i] - x[g, c, j]).mean() for c in range(len(chars))
                           for i in range(k) for j in range(k)])
        assert between > max(within[f], within[g]), (faces[f], faces[g], between, within[f], within[g])


def test_caption_words_take_distinct_slots_of_the_embedded_text_encoder():
    from montrage.config import EmbeddedModelConfig
    from montrage.models.text import WordTokenizer

    tok = WordTokenizer(EmbeddedModelConfig().max_text_length, EmbeddedModelConfig().hash_buckets)
    words = ["letter", *T.DEFAULT_FACES, *T.DEFAULT_CHARACTERS]
    ids = [tok.word_id(w) for w in words]
    assert len(set(ids)) == len(words), dict(zip(words, ids))
    assert tok([T.caption("cmti10", "g")])[0, :5].tolist() == [tok.word_id(w) for w in ("the", "letter", "g", "in", "cmti10")]


def test_holdout_pairs_and_exclude(tmp_path):
    held = T.holdout_pairs(seed=1)
    assert [f for f, _ in held] == list(T.DEFAULT_FACES)
    assert len({c for _, c in held}) == len(T.DEFAULT_CHARACTERS)  # 8 faces, 8 characters: each held out once
    root = T.write_typeface_folder(tmp_path / "tf", exclude=held)
    ts = load_imagefolder(root, 16)
    kept = {(c, e["object"]) for c, e in zip(ts.concepts, ts.extra)}
    assert len(ts) == 64 - len(held) and not kept & set(held)
    # a pair renders the same pixels whatever else is in the set (seeded by content, not position)
    face, ch = ts.concepts[5], ts.extra[5]["object"]
    again, recs = T.render_pairs([(face, ch)], per_pair=1, seed=0)
    np.testing.assert_array_equal(again[0], ts.images[5])
    assert recs[0].file_name == ts.file_names[5]
    # unseen images in a face's style: fresh copies and characters outside the set
    fresh, _ = T.render_pairs([(face, ch)], per_pair=1, seed=0, first_copy=1)
    assert not np.array_equal(fresh[0], ts.images[5])
    unseen, recs = T.render_pairs([(face, c) for c in T.UNSEEN_CHARACTERS[:2]])
    assert unseen.shape == (2, 16, 16, 3) and not set(T.UNSEEN_CHARACTERS) & set(T.DEFAULT_CHARACTERS)


def test_every_listed_face_renders_from_matplotlib():
    for face in T.FACES:
        assert T.font_path(face).is_file()
        img = T.render_glyph(face, "g", jitter=False)
        assert img.min() < 80 and img.max() == 255  # ink on white paper


@pytest.mark.parametrize("kwargs, match", [
    (dict(faces=("comic-sans",)), "unknown typeface"),
    (dict(characters=("ab",)), "single letters"),
    (dict(characters=("a", "A")), "differ only in case"),
    (dict(exclude=[("dejavusans", "z")]), "not in the set"),
    (dict(per_pair=0), "per_pair"),
])
def test_bad_arguments_raise_config_errors(tmp_path, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        T.write_typeface_folder(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()  # nothing half-written

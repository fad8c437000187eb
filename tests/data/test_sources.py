"""Training data from any source: datasets.Dataset, rows of dicts, lazy imagefolders; images streamed."""
from __future__ import annotations

import json
import weakref

import numpy as np
import pytest
from PIL import Image

from montrage.data.imagefolder import TrainingSet, load_imagefolder
from montrage.data.lazy import LazyImages
from montrage.data.sources import as_training_set
from montrage.errors import DataError

R = 8


def _pil(i: int, size=(R, R), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(i)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8), mode)


class CountingRows:
    """A sequence of dict rows whose images are made on access; tracks how many are alive at once."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.alive, self.peak = n, 0, 0, 0

    def __len__(self) -> int:
        return self.n

    def _gone(self) -> None:
        self.alive -= 1

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.calls += 1
        img = np.random.default_rng(i).integers(0, 256, (R, R, 3), dtype=np.uint8)
        self.alive += 1
        self.peak = max(self.peak, self.alive)
        weakref.finalize(img, self._gone)
        return {"image": img, "text": f"caption {i}", "concept": f"c{i % 2}", "object": "circle"}


def test_lazy_source_never_holds_more_than_a_batch():
    src = CountingRows(150)
    ts = as_training_set(src, R)
    assert isinstance(ts.images, LazyImages) and ts.images.shape == (150, R, R, 3) and ts.images.dtype == np.uint8
    assert src.calls == 150 and src.peak <= 2  # one pass for the captions; no image kept (the loop variable holds one)
    assert ts.captions[3] == "caption 3" and ts.concepts[:2] == ["c0", "c1"] and ts.extra[0] == {"object": "circle"}
    want = [np.random.default_rng(i).integers(0, 256, (R, R, 3), dtype=np.uint8) for i in (7, 2)]
    got = ts.images[[7, 2]]
    assert got.dtype == np.uint8 and got.shape == (2, R, R, 3)
    np.testing.assert_array_equal(got, np.stack(want))
    np.testing.assert_array_equal(ts.images[7], want[0])
    assert src.calls == 153 and ts.images[2:5].shape == (3, R, R, 3) and ts.images[-1].shape == (R, R, 3)
    # fingerprint streams (never more than one batch alive) and equals the in-memory set's
    src.calls, src.peak = 0, 0
    fp = ts.fingerprint()
    assert src.calls == 150 and src.peak <= 64
    eager = TrainingSet(images=ts.images[:], captions=ts.captions, concepts=ts.concepts, file_names=ts.file_names,
                        extra=ts.extra, root="")
    assert fp == eager.fingerprint()
    # a subset stays lazy: nothing is decoded until indexed
    src.calls = 0
    sub = ts.subset([5, 1])
    assert src.calls == 0 and isinstance(sub.images, LazyImages)
    np.testing.assert_array_equal(sub.images[:], ts.images[[5, 1]])
    assert sub.captions == ["caption 5", "caption 1"]


def _write_folder(root, rows):
    root.mkdir()
    lines = []
    for i, (img, text, concept) in enumerate(rows):
        name = f"{i:03d}.png"
        img.save(root / name)
        lines.append(json.dumps({"file_name": name, "text": text, "concept": concept, "object": "ring"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return root


def test_datasets_dataset_equals_the_imagefolder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [(_pil(0), "a ring by a", "a"), (_pil(1, (12, 10), "RGBA"), "a ring by b", "b"), (_pil(2, (5, 5)), "x", "")]
    folder = _write_folder(tmp_path / "folder", rows)
    ds = datasets.Dataset.from_dict(
        {"image": [Image.open(folder / f"{i:03d}.png") for i in range(3)], "text": [r[1] for r in rows],
         "concept": [r[2] for r in rows], "file_name": [f"{i:03d}.png" for i in range(3)], "object": ["ring"] * 3},
        features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                    "concept": datasets.Value("string"), "file_name": datasets.Value("string"),
                                    "object": datasets.Value("string")}))
    from_ds = as_training_set(ds, R)
    eager = load_imagefolder(folder, R)
    lazy_folder = as_training_set(str(folder), R)
    assert isinstance(from_ds.images, LazyImages) and isinstance(lazy_folder.images, LazyImages)
    for ts in (from_ds, lazy_folder):
        np.testing.assert_array_equal(ts.images[:], eager.images)
        assert (ts.captions, ts.concepts, ts.file_names, ts.extra) == (eager.captions, eager.concepts,
                                                                      eager.file_names, eager.extra)
        assert ts.fingerprint() == eager.fingerprint()
    assert as_training_set(eager, R) is eager
    with pytest.raises(DataError, match="resolution|16x16"):
        as_training_set(eager, 16)


def test_dataset_without_caption_column_names_its_columns_and_the_fix():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"image": [_pil(0), _pil(1)], "prompt": ["a", "b"]})
    with pytest.raises(DataError, match=r"no caption column 'text' \(its columns: image, prompt\).*caption_column="):
        as_training_set(ds, R)
    ts = as_training_set(ds, R, caption_column="prompt")
    assert ts.captions == ["a", "b"] and ts.concepts == ["", ""] and ts.file_names == ["row-000000", "row-000001"]
    assert ts.images[:].shape == (2, R, R, 3)
    with pytest.raises(DataError, match="image_column="):
        as_training_set(ds, R, image_column="picture", caption_column="prompt")
    with pytest.raises(DataError, match="caption_column="):
        as_training_set([{"image": _pil(0), "caption": "a"}], R)
    with pytest.raises(DataError, match=r"splits train.*data\['train'\]"):
        as_training_set(datasets.DatasetDict({"train": ds}), R)
    with pytest.raises(DataError, match="uint8"):
        as_training_set([{"image": np.zeros((R, R, 3), np.float32), "text": "a"}], R).images[0]


def test_monitor_records_a_run_from_a_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    import torch

    from montrage.config import CaptureConfig, LoraSettings
    from montrage.callbacks.monitor import TrainingMonitor
    from montrage.data.probes import Probe
    from montrage.models.loading import load_base
    from montrage.models.lora import add_lora
    from montrage.storage import RunStore
    from montrage.storage import schema as S

    comps = load_base("embedded")
    add_lora(comps.unet, LoraSettings(rank=2, target_modules=("to_q",)))
    res = comps.resolution
    ds = datasets.Dataset.from_dict({"image": [_pil(i, (res, res)) for i in range(4)],
                                     "text": [f"a circle by artist-{i % 2}" for i in range(4)],
                                     "concept": [f"artist-{i % 2}" for i in range(4)]})
    capture = CaptureConfig(modules=("mid_block",), timesteps=(500,), anchors=0, every_n_steps=1, probe_steps=2,
                            conditions=("caption",))
    probes = [Probe("a circle by artist-0", 1), Probe("a circle by artist-1", 2)]
    monitor = TrainingMonitor(tmp_path / "run", comps, ds, probes=probes, capture=capture)
    assert isinstance(monitor.training_set.images, LazyImages)
    monitor.on_train_begin(0)
    with torch.no_grad():
        next(p for n, p in comps.unet.named_parameters() if "lora_B" in n).add_(0.1)
    monitor.on_train_end(1)
    store = RunStore.open(tmp_path / "run")
    assert list(store.steps) == [0, 1]
    assert list(store.train_meta[S.ATTR_CAPTIONS]) == list(ds["text"])
    assert list(store.train_meta[S.ATTR_CONCEPTS]) == ["artist-0", "artist-1"] * 2
    feats = store.features("train", "mid_block")
    assert feats.shape[:2] == (2, 4) and np.isfinite(feats).all()
    assert not np.allclose(feats[0], feats[1])  # the LoRA change reached the recorded features


def test_capture_and_training_batches_read_a_lazy_set_like_an_array():
    """FeatureExtractor.extract and training.step_batch take the lazy images as they take the array."""
    import torch

    from montrage.config import CaptureConfig, TrainConfig
    from montrage.data.lazy import take_rows
    from montrage.models.features import FeatureExtractor
    from montrage.models.loading import load_base
    from montrage.training import step_batch

    comps = load_base("embedded")
    src = CountingRows(6)
    src_res = [{**src[i], "image": np.asarray(_pil(i, (comps.resolution + 3, comps.resolution)))} for i in range(6)]
    lazy = as_training_set(src_res, comps.resolution)
    eager = lazy.images[:]
    ext = FeatureExtractor(comps, CaptureConfig(modules=("mid_block",), timesteps=(300,), batch_size=2))
    view = take_rows(lazy.images, [4, 0, 2])
    assert isinstance(view, LazyImages)
    a = ext.extract(view, ["a", "b", "c"], [1, 2, 3])
    b = ext.extract(eager[[4, 0, 2]], ["a", "b", "c"], [1, 2, 3])
    np.testing.assert_array_equal(a.losses, b.losses)
    np.testing.assert_array_equal(a.features["mid_block"], b.features["mid_block"])
    cfg = TrainConfig(steps=2, batch_size=3, prior_fraction=0.0)
    in_memory = TrainingSet(images=eager, captions=lazy.captions, concepts=lazy.concepts, file_names=lazy.file_names,
                            extra=lazy.extra, root="")
    for x, y in zip(step_batch(1, 0, cfg, lazy, None, comps), step_batch(1, 0, cfg, in_memory, None, comps)):
        if isinstance(x, list):
            assert x == y
        else:
            assert torch.equal(x, y)

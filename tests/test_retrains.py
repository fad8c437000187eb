"""`montrage fit --retrains N`: LoRAs retrained on subsets of the run's training set, the losses of the run's own
generations under them, and a fused prompt model fitted to them with a held-out LDS."""
import json
from pathlib import Path

import numpy as np
import pytest

from montrage.analysis.fused import kinds as FK
from montrage.analysis.fused import rules as FR
from montrage.analysis.fused import supervision as FS
from montrage.cli import main
from montrage.errors import ConfigError, ScorerError
from montrage.retrains import fit_run, retrain, subsets
from montrage.storage import RunStore
from montrage.storage import schema as S


def test_subsets_are_seeded_distinct_halves():
    a, b = subsets(10, 3, 0.5, seed=0), subsets(10, 3, 0.5, seed=1)
    assert all(len(s) == 5 and s == sorted(set(s)) for s in a + b)
    assert a == subsets(10, 3, 0.5, seed=0) and a != b and len({tuple(s) for s in a}) == 3


@pytest.mark.slow
def test_retrains_store_targets_and_the_prompt_model_is_fitted_to_them(tiny_run_copy, capsys):
    run = tiny_run_copy
    res = retrain(run, 4, steps=2, progress=False)
    store = RunStore.open(run)
    n, anchors = len(store.train_meta["file_names"]), FS.supervision_anchors(store)
    assert res.reused == 0 and len(res.loras) == 4 and all(p.is_file() for p in res.loras)
    with np.load(res.targets) as z:
        assert z["masks"].shape == (4, n) and z["losses"].shape == (4, len(anchors))
        assert np.isfinite(z["losses"]).all() and (z["losses"] > 0).all()
        assert list(z["anchors"]) == anchors and int(z["step"]) == int(store.steps[-1])
        # every subset is a half of the training set, and the subsets differ
        assert (z["masks"].sum(1) == n // 2).all() and len({tuple(m) for m in z["masks"]}) == 4
        # a retrained LoRA is a different model: the losses differ between subsets
        assert np.ptp(z["losses"], axis=0).max() > 0
    again = retrain(run, 4, steps=2, progress=False)
    assert again.reused == 4  # cached: nothing retrained

    assert main(["--quiet", "fit", str(run), "--json", str(run / "fit.json")]) == 0
    out = capsys.readouterr().out
    assert "held-out LDS" in out and "montrage [prompt]" in out
    models = json.loads((run / "fit.json").read_text())["montrage"]
    prompt, image = models[FK.PROMPT], models[FK.IMAGE]
    cf = prompt["counterfactual"]
    assert cf["retrains"] == 4 and -1.0 <= cf["heldout_lds_with"] <= 1.0 and -1.0 <= cf["heldout_lds_without"] <= 1.0
    # adopted only when the held-out LDS says so, and the supervision line says which
    gain = cf["heldout_lds_with"] - cf["heldout_lds_without"]
    assert cf["adopted"] == (gain > max(FR.COUNTERFACTUAL_ADOPT_MARGIN, 2 * cf["heldout_gain_se"]))
    assert cf["adopted"] == ("counterfactual: losses of the generations" in prompt["supervision"])
    assert not image["counterfactual"]  # image-only queries are not fitted to the caption generations' losses
    ex = prompt["exact_caption"]  # the exact-caption rule's own check, printed with the fit
    assert len(ex["supervision_r1"]) == 2 and ex["adopted"] == (ex["supervision_r1"][1] >= ex["supervision_r1"][0])
    assert "exact caption first: R@1 on the generated supervision" in out and not image["exact_caption"]
    if ex["adopted"]:  # with targets, the other images' share on an exact-caption query is chosen on them too
        assert ex["others_share"] in FR.EXACT_CAPTION_SHARES and "share" in ex["share_why"]
        assert "the other images' share" in out
    saved = list((run / "montrage-models").glob("montrage-prompt-*.json"))
    assert saved and any(json.loads(p.read_text())["counterfactual"] for p in saved)


def test_bad_retrain_requests_get_one_clear_error(tiny_run_copy):
    with pytest.raises(ConfigError, match="at least 2 subsets"):
        retrain(tiny_run_copy, 1)
    with pytest.raises(ConfigError, match="fraction"):
        retrain(tiny_run_copy, 2, fraction=1.0)
    assert not (tiny_run_copy / S.RETRAINS_DIRNAME).exists()  # nothing half-written
    with pytest.raises(ScorerError, match="'pixel' is not a fitted model; --methods takes montrage, montrage-all"):
        fit_run(tiny_run_copy, ["pixel"])
    assert not (tiny_run_copy / "montrage-models").exists()


def test_a_run_without_recorded_training_settings_cannot_be_retrained(tiny_run_copy, monkeypatch):
    """A run recorded by a user's own loop has no `montrage train` settings to retrain with."""
    cfg = dict(RunStore.open(tiny_run_copy).run_config)
    cfg.pop("train", None)
    monkeypatch.setattr(RunStore, "run_config", property(lambda self: cfg))
    with pytest.raises(ConfigError, match="did not record"):
        retrain(tiny_run_copy, 2)


def test_targets_of_another_checkpoint_are_not_used(tiny_run_copy):
    """Counterfactual targets are losses of one checkpoint's generations: a fit at another checkpoint ignores them."""
    from montrage.analysis.base import ScoringContext
    from montrage.analysis.queries import probe_queries

    store = RunStore.open(tiny_run_copy)
    anchors = FS.supervision_anchors(store)
    path = tiny_run_copy / S.RETRAINS_DIRNAME / S.RETRAIN_TARGETS_FILENAME
    path.parent.mkdir()
    np.savez(path, masks=np.ones((2, 8)), losses=np.ones((2, len(anchors))), anchors=np.asarray(anchors),
             step=int(store.steps[-1]), timesteps=np.asarray([100]))
    last = ScoringContext(store=store, queries=probe_queries(store), checkpoint=store.n_checkpoints - 1)
    first = ScoringContext(store=store, queries=probe_queries(store), checkpoint=0)
    cf = FS.load_counterfactual(last, anchors, 3 * len(anchors))
    assert cf is not None and list(cf.rows) == list(range(2 * len(anchors), 3 * len(anchors)))
    assert FS.load_counterfactual(first, anchors, 3 * len(anchors)) is None
    assert FS.load_counterfactual(last, anchors[:-1], 3 * len(anchors)) is None


def test_a_cached_retrain_is_reused_only_under_its_own_key_and_never_half_written(tmp_path, monkeypatch):
    """The cache behind both `fit --retrains` and the LDS benchmark: same key -> reused; another key -> retrained;
    a failed retrain leaves neither a LoRA nor a key that would pass for one."""
    import montrage.training as T
    from montrage.config import TrainConfig
    from montrage.retrains import is_cached, retrained_lora

    calls = []

    def fake_train(data, out, **kw):
        calls.append(sorted(p.name for p in data.iterdir()))
        if kw["cfg"].seed == 13:
            raise RuntimeError("interrupted")
        out.mkdir(parents=True)
        (out / "final.safetensors").write_bytes(b"lora %d" % len(calls))
        return T.TrainResult(out, 1, 0, 0.0, out / "final.safetensors")

    monkeypatch.setattr(T, "train", fake_train)

    def write(dst):
        dst.mkdir(parents=True)
        (dst / "metadata.jsonl").write_text("{}\n")
        return dst

    folder, cfg = tmp_path / "subset-1", TrainConfig(steps=1)
    lora, reused = retrained_lora(folder, {"indices": [0, 2]}, write, cfg)
    assert not reused and lora.read_bytes() == b"lora 1" and calls == [["metadata.jsonl"]]
    assert retrained_lora(folder, {"indices": [0, 2]}, write, cfg) == (lora, True) and len(calls) == 1
    lora, reused = retrained_lora(folder, {"indices": [0, 3]}, write, cfg)  # another subset: trained again
    assert not reused and lora.read_bytes() == b"lora 2" and is_cached(folder, {"indices": [0, 3]})
    with pytest.raises(RuntimeError, match="interrupted"):
        retrained_lora(folder, {"indices": [1, 3]}, write, TrainConfig(steps=1, seed=13))
    assert not is_cached(folder, {"indices": [1, 3]}) and is_cached(folder, {"indices": [0, 3]})
    assert not list(folder.glob("*.part"))


def test_a_multi_process_run_is_retrained_with_its_passes_per_image(tiny_run_copy, monkeypatch):
    """A run trained on W processes saw W x batch_size images per step: a one-process retrain of a fraction of
    the images takes W x steps x fraction steps (told --steps always win)."""
    from montrage.retrains import _train_config

    cfg = dict(RunStore.open(tiny_run_copy).run_config)
    steps = int(cfg["train"]["steps"])
    for world, want in ((1, round(steps * 0.5)), (2, steps)):
        patched = dict(cfg, world_size=world)
        monkeypatch.setattr(RunStore, "run_config", property(lambda self, c=patched: c))
        store = RunStore.open(tiny_run_copy)
        assert _train_config(store, 0.5, None).steps == max(1, want)
        assert _train_config(store, 0.5, 3).steps == 3


def test_the_prior_images_enter_the_retrain_key_by_content_not_path(tmp_path):
    """A run folder copied or moved (its prior folder with it) keeps its cached retrains; other prior images do not."""
    import shutil
    from types import SimpleNamespace

    from montrage.data.imagefolder import write_imagefolder
    from montrage.retrains import _prior_identity

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (8, 8, 3), dtype=np.uint8) for _ in range(3)]
    rows = [{"file_name": f"p{i}.png", "text": f"a shape {i}"} for i in range(3)]
    prior = write_imagefolder(tmp_path / "prior", images, rows)
    store = SimpleNamespace(run_config={"resolution": 8})
    moved = Path(shutil.copytree(prior, tmp_path / "elsewhere" / "prior"))
    assert _prior_identity(prior, store) == _prior_identity(moved, store)
    images[1] = 255 - images[1]
    other = write_imagefolder(tmp_path / "other", images, rows)
    assert _prior_identity(other, store) != _prior_identity(prior, store)
    assert _prior_identity(None, store) is None

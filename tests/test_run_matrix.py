"""Issue 10's matrix: a run recorded each way is self-contained and as analysable as any other.

Each way records a tiny run (2 concepts x 3 images, 4 steps, checkpoints at 0/2/4, one captured module and
timestep, 4 probes with 2 DDIM steps); then, with the data folder renamed away and from another working
directory, every registered method scores the run, ``compare`` and ``report`` run on it, and the results are
checked against what is known: finite (queries x 6) scores, a query that is a copy of a training image ranks
that image first (pixel, montrage), the report embeds the training images' thumbnails.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from montrage.config import CaptureConfig, LoraSettings, TrainConfig
from montrage.data.probes import Probe, save_probe_file
from montrage.storage import RunStore

WAYS = ["train", "calls", "attach", "script-calls", "script-hook"]
STEPS, EVERY, LR, RANK, ALPHA = 4, 2, 5e-3, 4, 2.0
MODULE, TIMESTEP = "mid_block", 300
PROBES = [Probe("a circle by artist-0", 11, "artist-0"), Probe("a square by artist-0", 12, "artist-0"),
          Probe("a circle by artist-1", 13, "artist-1"), Probe("a square by artist-1", 14, "artist-1")]
FAST = {"proj_dim": 64, "inversion_steps": 2}  # gradient methods: small projection, short DDIM inversion
CONCEPT = {"prompt": "a circle by artist-1", "concept": "by artist-1"}
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train_text_to_image_lora.py"


def capture() -> CaptureConfig:
    return CaptureConfig(modules=(MODULE,), timesteps=(TIMESTEP,), anchors=3, probe_steps=2, every_n_steps=EVERY)


def _hand_loop(run: Path, data: Path, attach: bool) -> None:
    """A user's own loop: explicit monitor calls, or monitor.attach(accelerator) + save_state."""
    from accelerate import Accelerator

    from montrage import TrainingMonitor, add_lora, load_base, load_imagefolder
    from montrage.losses.diffusion import denoising_loss
    from montrage.models.sampling import uint8_to_pixels

    torch.manual_seed(0)
    comps = load_base("embedded")
    params = add_lora(comps.unet, LoraSettings(rank=RANK, alpha=ALPHA))
    comps.unet.train()
    opt = torch.optim.AdamW(params, lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 2))
    ts = load_imagefolder(data, comps.resolution)
    acc = Accelerator(cpu=True)
    unet, opt, sched = acc.prepare(comps.unet, opt, sched)
    # "calls" records its batch size and warm-up (steps, lr and the adapter are read from the run); "attach" nothing
    training = None if attach else TrainConfig(batch_size=2, warmup_steps=2, prior_fraction=0.0)
    monitor = TrainingMonitor(run, comps, ts, probes=PROBES, capture=capture(), accelerator=acc, optimizer=opt,
                              training=training)
    step = 0
    if attach:
        monitor.attach(acc, global_step=lambda: step)
        acc.register_for_checkpointing(monitor)
    monitor.on_train_begin()
    g = torch.Generator().manual_seed(0)
    for step in range(1, STEPS + 1):
        idx = torch.randint(0, len(ts), (2,), generator=g).tolist()
        latents = comps.to_latents(uint8_to_pixels(ts.images[idx]))
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        cond = comps.encode_prompts([ts.captions[i] for i in idx])
        loss = denoising_loss(lambda x, tt, c: comps.predict(x, tt, c, unet=unet), comps.noise_scheduler,
                              latents, noise, t, cond).mean()
        acc.backward(loss)
        opt.step()
        sched.step()
        opt.zero_grad()
        if attach:
            if step % EVERY == 0:
                acc.save_state(str(run / "accelerate" / f"ckpt-{step}"))
        else:
            monitor.on_step_end(step, float(loss.detach()))
    monitor.on_train_end(STEPS)


def record(way: str, root: Path, data: Path) -> Path:
    run = root / way
    probes = save_probe_file(PROBES, root / "probes.jsonl")
    if way == "train":
        from montrage.training import train

        cfg = TrainConfig(steps=STEPS, batch_size=2, lr=LR, warmup_steps=2, prior_fraction=0.0,
                          lora=LoraSettings(rank=RANK, alpha=ALPHA))
        train(data, run, cfg=cfg, capture=capture(), probes_file=probes, progress=False, capture_mode="inline")
    elif way in ("calls", "attach"):
        _hand_loop(run, data, attach=way == "attach")
    else:
        spec = importlib.util.spec_from_file_location("train_text_to_image_lora", SCRIPT)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.main(["--pretrained_model_name_or_path", "embedded", "--train_data_dir", str(data), "--output_dir", str(run),
                  "--train_batch_size", "2", "--max_train_steps", str(STEPS), "--learning_rate", str(LR),
                  "--lr_warmup_steps", "2", "--rank", str(RANK), "--lora_alpha", str(ALPHA),
                  "--checkpointing_steps", str(EVERY), "--probe_steps", "2", "--capture_modules", MODULE,
                  "--capture_timesteps", str(TIMESTEP), "--probes_file", str(probes), "--seed", "0"]
                 + (["--use-save-state-hook"] if way == "script-hook" else []))
    return run


@pytest.fixture(scope="module", params=WAYS)
def recorded(request, tmp_path_factory):
    """(way, run folder, a training image copied out of the run) with the data folder gone."""
    from montrage.data.synthetic import write_concept_dataset

    root = tmp_path_factory.mktemp(f"matrix-{request.param}")
    data = write_concept_dataset(root / "data", n_artists=2, images_per_artist=3)
    run = record(request.param, root, data)
    shutil.move(str(data), str(root / "data-gone"))  # analysis must not need the original folder
    shutil.rmtree(root / "data-gone")
    return request.param, run


def test_run_records_everything_a_scorer_needs(recorded):
    way, run = recorded
    st = RunStore.open(run)
    cfg = st.run_config
    assert st.steps.tolist() == [0, 2, 4]
    assert st.images_stored and st.train_images().shape == (6, 16, 16, 3)
    assert (cfg["lora"]["r"], cfg["lora"]["lora_alpha"]) == (RANK, ALPHA)  # read from the model, whatever the way
    assert cfg["base"] == "embedded" and cfg["base_identity"] and cfg["resolution"] == 16
    assert cfg["optimizer"]["class"].endswith("AdamW")
    # warm-up over 2 steps then constant, read from the optimizer at each checkpoint
    # (accelerate's prepared scheduler steps once per process, so this holds on one process)
    np.testing.assert_allclose(st.learning_rates, [LR / 2, LR, LR])


def test_every_method_compare_and_report_from_elsewhere(recorded, tmp_path, monkeypatch):
    from montrage.analysis.attribute import attribute
    from montrage.analysis.base import available
    from montrage.cli import main

    way, run = recorded
    monkeypatch.chdir(tmp_path)  # another working directory; the data folder is gone
    st = RunStore.open(run)
    n_probes = len(st.probe_meta["prompts"])
    methods = available()
    assert {"montrage", "pixel", "tracin", "dtrak", "concept-trak", "final-sim"} <= set(methods)
    cache: dict = {}
    for method in methods:
        if method == "final-sim":  # through the CLI: its JSON is what `report` reuses below
            assert main(["--quiet", "attribute", str(run), "--method", method, "--show", "0"]) == 0
            payload = json.loads((run / f"attribution_{method}_4.json").read_text())
            assert len(payload["queries"]) == n_probes and payload["score_path"].startswith("attribution/final-sim/4/")
            continue
        options = dict(FAST, **(CONCEPT if method == "concept-trak" else {}))
        res = attribute(run, method, options=options, progress=False, ctx_cache=cache)
        assert res.scores.shape == (n_probes, 6), method
        assert np.isfinite(res.scores).all(), method
        assert res.payload["queries"][0]["top"], method

    # copies of the 6 training images (read back from the run) as query images: each is its own best match
    queries = tmp_path / "queries"
    queries.mkdir()
    for i, im in enumerate(st.train_images()):
        Image.fromarray(im).save(queries / f"copy-{i}.png")
    for method in ("pixel", "montrage"):
        res = attribute(run, method, images_dir=queries, options=dict(FAST), progress=False, ctx_cache=cache)
        assert [q["top"][0]["train_index"] for q in res.payload["queries"]] == list(range(6)), (method, res.scores)
    # probes and the query images were scored separately: both score sets are kept
    sets = [a for a in RunStore.open(run).attributions() if a["method"] == "pixel"]
    assert sorted(len(a["query_ids"]) for a in sets) == sorted([6, n_probes])

    assert main(["--quiet", "compare", str(run), "--method", "final-sim"]) == 0
    curves = json.loads((run / "compare_final-sim.json").read_text())
    assert curves["steps"] == [0, 2, 4] and set(curves["curves"]) == {"artist-0", "artist-1"}
    assert main(["--quiet", "report", str(run), "--method", "final-sim", "--out", str(tmp_path / "r.html")]) == 0
    html = (tmp_path / "r.html").read_text()
    assert "training images unavailable" not in html and "could not be read" not in html
    assert html.count("data:image/png;base64,") >= 6 + n_probes  # training thumbnails + probe generations


def test_recorded_training_settings_are_what_a_retrain_uses(recorded):
    """Every way that records its training settings can be retrained as the run trained (same passes over each
    image); fields a user's loop leaves None come from the run itself. A run that recorded none gets one clear
    error naming the fix."""
    from montrage.errors import ConfigError
    from montrage.retrains import _train_config

    way, run = recorded
    st = RunStore.open(run)
    if way == "attach":  # this loop passed no training settings
        with pytest.raises(ConfigError, match=r"training=TrainConfig"):
            _train_config(st, 0.5, None)
        return
    cfg = _train_config(st, 0.5, None)
    assert (cfg.steps, cfg.batch_size, cfg.warmup_steps, cfg.prior_fraction) == (STEPS // 2, 2, 2, 0.0)
    assert cfg.lr == pytest.approx(LR) and (cfg.lora.rank, cfg.lora.alpha) == (RANK, ALPHA)
    assert cfg.resolution == 16 and _train_config(st, 0.5, 7).steps == 7  # told


@pytest.mark.slow
def test_a_run_recorded_by_the_example_script_is_refitted_with_retrains(recorded, tmp_path):
    """`montrage fit --retrains` on a run the user's own (example) loop recorded, from its store alone."""
    from montrage.cli import main

    way, run = recorded
    if way != "script-calls":
        pytest.skip("one user-loop way is enough end to end; the settings of every way are checked above")
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    assert main(["--quiet", "fit", str(copy), "--retrains", "2", "--json", str(tmp_path / "fit.json")]) == 0
    targets = np.load(copy / "retrains" / "targets.npz")
    assert targets["masks"].shape == (2, 6) and targets["masks"].sum(1).tolist() == [3, 3]
    assert targets["losses"].shape == (2, len(targets["anchors"])) and np.isfinite(targets["losses"]).all()
    fitted = json.loads((tmp_path / "fit.json").read_text())["montrage"]["prompt"]
    assert fitted["counterfactual"]["retrains"] == 2

"""``bench overhead-realsize`` end to end at the --small size on CPU: the base folder it writes is one montrage
loads, the ratios come from real timed runs, and the SD-1.5 shapes are the real ones (checked on the
configs, without building the 860M-parameter UNet)."""
from __future__ import annotations

import json

import pytest

from benchmarks import overhead_realsize as B


def test_small_bench_end_to_end(tmp_path):
    from montrage.models.loading import load_base
    from montrage.storage import RunStore

    res = B.measure(tmp_path, small=True, steps=2, every=1, repeats=1, modes=("plain", "background"))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["device"] == "cpu" and saved["small"] and saved["checkpoints"] == 3
    for mode in ("plain", "background"):
        run = saved["runs"][mode][0]
        assert 0 < run["setup_s"] < run["lora_saved_s"] <= run["total_s"]
    med, r = saved["median"], saved["ratios"]["background"]
    assert r["lora_saved"] == pytest.approx(med["background"]["lora_saved_s"] / med["plain"]["lora_saved_s"])
    assert r["total"] == pytest.approx(med["background"]["total_s"] / med["plain"]["total_s"])
    assert r["total"] > 1.0  # the worker's start-up and capture are inside the whole call, never free
    # the monitored run really captured every checkpoint; the plain one wrote no store
    st = RunStore.open(tmp_path / "run-background0")
    assert st.n_checkpoints == 3 and not st.pending_steps
    assert not RunStore.exists(tmp_path / "run-plain0")

    comps = load_base(res["base"])
    assert comps.vae is not None and comps.resolution == B.base_resolution(True) == 16
    assert comps.encode_prompts(["a circle by artist-0"]).shape == (1, B.TEXT_MAX_LENGTH, 16)
    md = B.markdown(res)
    assert "LoRA saved / plain" in md and "<= 1.05" in md and "<= 1.3" in md
    assert B.write_base_folder(tmp_path / "base-small", small=True) == tmp_path / "base-small"  # reused


def test_full_size_parts_are_sd15_shaped():
    from benchmarks.realsize import SD15

    parts = B.part_configs(small=False)
    assert parts["text_encoder"]["hidden_size"] == 768 and parts["text_encoder"]["num_hidden_layers"] == 12
    assert parts["unet"]["block_out_channels"] == SD15["block_out_channels"]
    assert parts["unet"]["cross_attention_dim"] == 768 and parts["unet"]["in_channels"] == 4
    assert B.base_resolution(False) == 512


def test_registered_in_bench_cli():
    from benchmarks.cli import BENCHES, build_parser

    assert "overhead-realsize" in BENCHES
    assert build_parser().parse_args(["overhead-realsize", "--quick"]).kind == "overhead-realsize"


def test_capture_device_reaches_the_monitor_and_is_restored(monkeypatch):
    from montrage.callbacks.monitor import TrainingMonitor

    seen = []

    def stub(self, mode="background", threads=1, device="cpu", **kw):
        seen.append((mode, threads, device))

    monkeypatch.setattr(TrainingMonitor, "configure_capture", stub)
    with B.capture_device("cuda"):
        TrainingMonitor.configure_capture(None, "background", threads=1)  # as train() calls it
    with B.capture_device("cpu"):
        TrainingMonitor.configure_capture(None, "background", threads=1)
    assert seen == [("background", 1, "cuda"), ("background", 1, "cpu")]
    assert TrainingMonitor.configure_capture is stub

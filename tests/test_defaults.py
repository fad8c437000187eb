"""Data-dependent training defaults: one rule (config.resolve_defaults), explicit values win, recorded in the run."""
import pytest

from montrage.config import (DEFAULT_LR, DEFAULT_LR_DIFFUSERS, DEFAULT_MAX_STEPS, DEFAULT_MIN_STEPS, LoraSettings,
                             TrainConfig, resolve_defaults)
from montrage.errors import ConfigError


def test_rule_anchors_and_shape():
    assert resolve_defaults(24, 16, 16) == (600, 8, DEFAULT_LR)  # the synthetic demo's data: 200 passes
    steps64, rank64, _ = resolve_defaults(64, 16, 16)
    assert (steps64, rank64) == (1600, 16)  # the typeface set: what the quality gate measured
    assert resolve_defaults(64, 32, 16)[0] > steps64  # above the base's resolution: more steps again
    assert resolve_defaults(4, 16, 16)[0] == DEFAULT_MIN_STEPS
    assert resolve_defaults(10_000, 512, 512)[0] == DEFAULT_MAX_STEPS
    assert resolve_defaults(64, 512, 512, embedded=False)[2] == DEFAULT_LR_DIFFUSERS
    for n in (1, 24, 33, 64, 500):
        assert resolve_defaults(n, 16, 16)[0] % 50 == 0
    with pytest.raises(ConfigError, match="empty"):
        resolve_defaults(0, 16, 16)


def test_explicit_values_win_and_unset_ones_are_filled():
    cfg = TrainConfig()
    assert cfg.unresolved == ("steps", "lr", "lora")
    full = cfg.resolved(64, 16, 16)
    assert (full.steps, full.lora.rank, full.lr) == resolve_defaults(64, 16, 16) and full.unresolved == ()
    mine = TrainConfig(steps=7, lr=1e-3, lora=LoraSettings(rank=4, alpha=2.0)).resolved(64, 16, 16)
    assert (mine.steps, mine.lr, mine.lora.rank, mine.lora.alpha) == (7, 1e-3, 4, 2.0)
    with pytest.raises(ConfigError, match="steps"):
        TrainConfig(steps=0)


def test_cli_leaves_unset_flags_to_the_rule():
    from montrage.cli import _configs, build_parser

    args = build_parser().parse_args(["train", "--data", "d", "--output", "o"])
    cfg, _ = _configs(args)
    assert cfg.unresolved == ("steps", "lr", "lora")
    args = build_parser().parse_args(["train", "--data", "d", "--output", "o", "--steps", "9", "--rank", "4",
                                      "--lr", "0.01"])
    cfg, _ = _configs(args)
    assert (cfg.steps, cfg.lora.rank, cfg.lr) == (9, 4, 0.01)


def test_run_records_the_resolved_values(tiny_run):
    from montrage.storage import RunStore

    store = RunStore.open(tiny_run)
    try:
        rc = store.run_config
    finally:
        store.close()
    # tiny_configs gives steps and lr; the rank was left to the rule (8 images -> rank 8)
    assert rc["train_defaults_chosen"] == ["lora"]
    assert rc["train"]["lora"]["rank"] == 8 and rc["train"]["steps"] == 6

"""Bad inputs, driven through the CLI: ONE clear typed error naming the file/field and the fix, exit code 2,
'error: ...' on stderr, and nothing half-written (no store created, or the existing store unchanged).

Each case runs the command twice: once through ``montrage.cli.main`` (exit code, stderr) and once by
calling the parsed command's function directly, to see the exception type that main() turns into exit 2.
Run with ``-s`` to print the (input | error type | message excerpt) table.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Type

import pytest
import zarr
from PIL import Image

from montrage.cli import build_parser, main
from montrage.errors import (CaptureError, ConfigError, CheckpointNotFoundError, DataError, ModelLoadError, MontrageError,
                             ProbeFileError, StoreConfigMismatchError, StoreLayoutError)
from montrage.storage import RunStore
from montrage.storage import schema as S

# inline capture: no background worker to start per training (capture modes: tests/callbacks/test_capture_modes.py)
FAST = ["--steps", "1", "--checkpoint-every", "1", "--batch-size", "2", "--modules", "mid_block", "--pooling-grid", "1",
        "--capture", "inline"]


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> Path:
    from montrage.data.synthetic import write_concept_dataset

    return write_concept_dataset(tmp_path_factory.mktemp("bad") / "clean", n_artists=2, images_per_artist=3)


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("probes") / "probes.jsonl"
    p.write_text('{"prompt": "a circle by artist-0", "seed": 1}\n{"prompt": "a square by artist-1", "seed": 2}\n')
    return p


@pytest.fixture
def data(tmp_path, clean_data) -> Path:
    """A private copy of the clean dataset, to break."""
    return Path(shutil.copytree(clean_data, tmp_path / "data"))


@pytest.fixture(scope="module")
def existing_run(tmp_path_factory, clean_data, probes) -> Path:
    """A finished 1-step run (checkpoints at steps 0 and 1), recorded with --pooling-grid 1."""
    run = tmp_path_factory.mktemp("existing") / "run"
    assert main(["--quiet", "train", "--data", str(clean_data), "--output", str(run), "--probes", str(probes)] + FAST) == 0
    return run


def tree_digest(root: Path, skip=(S.LOCK_FILENAME,)) -> Dict[str, str]:
    """sha1 of every file under root (the lock file only holds a pid)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in skip}


def cli_error(argv: List[str], capsys, exc_type: Type[MontrageError], *needles: str, case: str = "") -> str:
    """The command fails with exit 2 and one 'error: ' line holding every needle; its exception is exc_type."""
    with pytest.raises(MontrageError) as info:
        args = build_parser().parse_args(argv)
        args.func(args)
    assert type(info.value) is exc_type, (type(info.value), info.value)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error: ") == 1, err
    assert "Traceback" not in err
    msg = err[len("error: "):].strip()
    for needle in needles:
        assert needle in msg, (needle, msg)
    with capsys.disabled():
        print(f"\n| {case} | {exc_type.__name__} | {msg[:220].replace('|', '/')}{'...' if len(msg) > 220 else ''} |")
    return msg


def train_argv(data: Path, out: Path, probes: Optional[Path] = None, extra: Optional[List[str]] = None) -> List[str]:
    argv = ["--quiet", "train", "--data", str(data), "--output", str(out)] + FAST + (extra or [])
    return argv + (["--probes", str(probes)] if probes else [])


def rewrite_metadata(data: Path, rows: List[dict] | None = None, text: Optional[str] = None) -> None:
    meta = data / "metadata.jsonl"
    meta.write_text(text if text is not None else "".join(json.dumps(r) + "\n" for r in rows))


def rows_of(data: Path) -> List[dict]:
    return [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- training data
def test_bad_data_is_reported_before_the_base_model_is_loaded(data, tmp_path, monkeypatch):
    """A real base takes minutes to load: a missing file must not wait for it."""
    import montrage.training as T
    from montrage.training import train

    (data / "artist-0_001.png").unlink()
    monkeypatch.setattr(T, "load_base", lambda *a, **k: pytest.fail("the base was loaded before the data was checked"))
    with pytest.raises(DataError, match="artist-0_001.png"):
        train(data, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_image_file(data, tmp_path, capsys):
    (data / "artist-0_001.png").unlink()
    out = tmp_path / "out"
    cli_error(train_argv(data, out), capsys, DataError, "artist-0_001.png", "not found", "metadata.jsonl, line 2",
              "add the file or fix its file_name", case="missing image file")
    assert not out.exists()


def test_corrupt_image(data, tmp_path, capsys):
    (data / "artist-1_000.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "out"
    cli_error(train_argv(data, out), capsys, DataError, "artist-1_000.png", "cannot read image",
              "replace it with a valid PNG/JPEG or remove its row", case="corrupt image")
    assert not out.exists()


def test_malformed_metadata_line(data, tmp_path, capsys):
    lines = (data / "metadata.jsonl").read_text().splitlines()
    lines[2] = '{"file_name": "artist-0_002.png", "text": "a triangle by artist-0",'  # truncated JSON
    rewrite_metadata(data, text="\n".join(lines) + "\n")
    out = tmp_path / "out"
    cli_error(train_argv(data, out), capsys, DataError, "metadata.jsonl, line 3", "not valid JSON",
              "each line must be one JSON object", case="malformed metadata.jsonl")
    assert not out.exists()


def test_empty_metadata(data, tmp_path, capsys):
    rewrite_metadata(data, text="\n\n")
    out = tmp_path / "out"
    cli_error(train_argv(data, out), capsys, DataError, "metadata.jsonl has no rows", "add one JSON object per image",
              case="empty metadata.jsonl")
    assert not out.exists()


def test_missing_text_field(data, tmp_path, capsys):
    rows = rows_of(data)
    del rows[4]["text"]
    rewrite_metadata(data, rows)
    out = tmp_path / "out"
    cli_error(train_argv(data, out), capsys, DataError, "line 5", "missing required field 'text'",
              "every row needs 'file_name' and 'text'", case="missing `text`")
    assert not out.exists()


def test_duplicate_file_name(data, tmp_path, capsys):
    rows = rows_of(data)
    rows.append(dict(rows[0], text="again"))
    rewrite_metadata(data, rows)
    out = tmp_path / "out"
    cli_error(train_argv(data, out), capsys, DataError, "'artist-0_000.png' appears on line 1 and again on line 7",
              "remove or rename the duplicate", case="duplicate file_name")
    assert not out.exists()


def test_mixed_sizes_and_modes_are_converted_with_a_warning(data, tmp_path, probes, capsys, caplog):
    img = Image.open(data / "artist-0_000.png")
    img.resize((40, 24)).save(data / "artist-0_000.png")  # another size (and not square)
    img.convert("L").save(data / "artist-1_001.png")  # greyscale
    img.convert("RGBA").save(data / "artist-1_002.png")  # with alpha
    out = tmp_path / "out"
    with caplog.at_level("WARNING"):
        assert main(train_argv(data, out, probes)) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "were not" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    w = warnings[0]
    for needle in ("3 of 6 images", "16x16 RGB", "converted to RGB from mode L (x1), RGBA (x1)",
                   "resized to 16x16 from 40x24 (x1)", "artist-0_000.png", "artist-1_001.png"):
        assert needle in w, (needle, w)
    with capsys.disabled():
        print(f"\n| mixed sizes/modes | (converted; logging WARNING) | {w[:220]}... |")
    st = RunStore.open(out)
    assert st.steps.tolist() == [0, 1]


# ---------------------------------------------------------------------------------------------- stores
def test_existing_store_with_another_config(existing_run, clean_data, probes, capsys):
    before = tree_digest(existing_run)
    cli_error(train_argv(clean_data, existing_run, probes, ["--pooling-grid", "2"]), capsys, StoreConfigMismatchError, str(existing_run), "another configuration",
              "pooling_grid: store has 1, requested 2", "Rerun with the original options, or choose a new --output",
              case="existing store, other config (--pooling-grid 2)")
    assert tree_digest(existing_run) == before


def test_existing_store_with_another_layout_version(existing_run, clean_data, probes, tmp_path, capsys):
    run = Path(shutil.copytree(existing_run, tmp_path / "run"))
    zarr.open_group(RunStore.store_path(run), mode="r+").attrs[S.ATTR_LAYOUT] = 999
    before = tree_digest(run)
    cli_error(train_argv(clean_data, run, probes), capsys, StoreLayoutError, "layout version 999",
              f"reads version {S.LAYOUT_VERSION}", "use a matching montrage or record a new run",
              case="existing store, other layout version (train)")
    cli_error(["--quiet", "attribute", str(run), "--method", "final-sim", "--query-mode", "A"], capsys,
              StoreLayoutError, "layout version 999", case="existing store, other layout version (attribute)")
    assert tree_digest(run) == before


def test_attribute_unknown_checkpoint(existing_run, capsys):
    before = tree_digest(existing_run)
    cli_error(["--quiet", "attribute", str(existing_run), "--method", "final-sim", "--query-mode", "A",
               "--checkpoint", "999"], capsys, CheckpointNotFoundError, "checkpoint at step 999 not in",
              "committed steps: [0, 1]", case="`attribute --checkpoint 999`")
    assert tree_digest(existing_run) == before
    assert not list(existing_run.glob("attribution_*.json"))


# ---------------------------------------------------------------------------------------------- options
def test_unknown_capture_module(data, tmp_path, capsys):
    out = tmp_path / "out"
    cli_error(train_argv(data, out, extra=["--modules", "nonexistent"]), capsys, CaptureError,
              "unknown UNet module(s) ['nonexistent']", "available block names include", "mid_block",
              case="`--modules nonexistent`")
    assert not out.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_capture_device_without_a_gpu(data, tmp_path, capsys):
    out = tmp_path / "out"
    cli_error(train_argv(data, out, extra=["--capture", "background", "--capture-device", "cuda:1"]), capsys,
              ConfigError, "capture device 'cuda:1'", "no GPU", "'cpu'", case="`--capture-device cuda:1` on a CPU machine")
    assert not out.exists()


def test_base_folder_missing_a_component(data, tmp_path, capsys):
    base = tmp_path / "sd"
    (base / "unet").mkdir(parents=True)
    (base / "scheduler").mkdir()
    out = tmp_path / "out"
    cli_error(train_argv(data, out, extra=["--base", str(base)]), capsys, ModelLoadError, str(base),
              "missing component(s) ['text_encoder', 'tokenizer']", "pipeline.save_pretrained(folder)",
              case="base model folder missing components")
    assert not out.exists()


def test_probe_file_with_bad_json(data, tmp_path, capsys):
    bad = tmp_path / "probes.jsonl"
    bad.write_text('{"prompt": "a circle by artist-0", "seed": 1}\n{"prompt": "a square", seed: 2}\n')
    out = tmp_path / "out"
    cli_error(train_argv(data, out, probes=bad), capsys, ProbeFileError, f"{bad}, line 2", "not valid JSON",
              "each line must be one JSON object", case="probe file with bad JSON")
    assert not out.exists()

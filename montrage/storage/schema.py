"""The run store's schema: every group, array, attribute and dimension name lives here.

Layout (Zarr v3, ``RUN_DIR/store.zarr``), arrays indexed by checkpoint along axis 0:

    /                                 attrs: layout_version, run_config, fingerprint, package_versions,
                                             committed_checkpoints (commit marker, written last)
    checkpoints/step                  (checkpoint,)                                  int64
    checkpoints/wall_time             (checkpoint,)                                  float64  seconds since run start
    checkpoints/train_loss            (checkpoint,)                                  float32  running mean since last ckpt
    checkpoints/learning_rate         (checkpoint,)                                  float64  optimizer lr at capture (NaN: unknown)
    train/                            attrs: file_names, captions, concepts, extra, dataset_fingerprint,
                                             source_root, images_stored
    train/images                      (train, height, width, channel)                uint8    (absent with store_images=False)
    train/image_sha256                (train, digest)                                uint8    sha256 of each image's pixels
    train/features/<module>           (checkpoint, train, condition, timestep, feature)  float32
    train/loss                        (checkpoint, train, condition, timestep)       float32
    anchors/                          attrs: indices (training images recorded with a second noise draw)
    anchors/features/<module>         (checkpoint, anchor, condition, timestep, feature)  float32
    anchors/loss                      (checkpoint, anchor, condition, timestep)      float32
    probes/                           attrs: prompts, seeds, concepts, kinds, meta
    probes/images                     (checkpoint, probe, height, width, channel)    uint8
    probes/features/<module>          (checkpoint, probe, condition, timestep, feature)  float32
    probes/loss                       (checkpoint, probe, condition, timestep)       float32
    lora/weights                      (checkpoint, parameter)                        float32  attrs: names, shapes
    attribution/<method>/<step>/<query_set>  (query, train)                          float32  attrs: query ids

``condition`` indexes ``run_config.capture.conditions`` (e.g. null, caption); ``timestep`` indexes
``run_config.capture.timesteps``. Module names are stored with '.' (e.g. ``up_blocks.0``) as array
names, which Zarr allows.
"""
from __future__ import annotations

from pathlib import Path

LAYOUT_VERSION = 2  # 2: training images + hashes, learning_rate, attribution keyed by query set
STORE_DIRNAME = "store.zarr"
LOCK_FILENAME = ".montrage.lock"
FINAL_LORA_FILENAME = "lora_final.safetensors"
RESUME_DIRNAME = "resume"
# beside the store: LoRAs retrained on subsets of the training set (`montrage fit --retrains N`), one folder per
# subset (its LoRA + subset.json), and the counterfactual targets the fused model is fitted with
RETRAINS_DIRNAME = "retrains"
RETRAIN_SUBSET_FILENAME = "subset.json"
RETRAIN_TARGETS_FILENAME = "targets.npz"

# root attributes
ATTR_LAYOUT = "layout_version"
ATTR_RUN_CONFIG = "run_config"
ATTR_FINGERPRINT = "fingerprint"
ATTR_VERSIONS = "package_versions"
ATTR_COMMITTED = "committed_checkpoints"
ATTR_NONFINITE = "nonfinite_checkpoints"

# groups
CHECKPOINTS = "checkpoints"
TRAIN = "train"
PROBES = "probes"
ANCHORS = "anchors"
FEATURE_KINDS = (TRAIN, ANCHORS, PROBES)
LORA = "lora"
ATTRIBUTION = "attribution"
FEATURES = "features"

# arrays
STEP = "step"
WALL_TIME = "wall_time"
TRAIN_LOSS = "train_loss"
LEARNING_RATE = "learning_rate"
IMAGE_SHA256 = "image_sha256"
LOSS = "loss"
IMAGES = "images"
WEIGHTS = "weights"

# group attributes
ATTR_FILE_NAMES = "file_names"
ATTR_CAPTIONS = "captions"
ATTR_CONCEPTS = "concepts"
ATTR_EXTRA = "extra"
ATTR_DATASET_FINGERPRINT = "dataset_fingerprint"
ATTR_SOURCE_ROOT = "source_root"  # absolute folder the training images were read from (None: not a folder)
ATTR_IMAGES_STORED = "images_stored"  # False: only source paths + per-image sha256 (store_images=False)
ATTR_PROMPTS = "prompts"
ATTR_SEEDS = "seeds"
ATTR_KINDS = "kinds"
ATTR_META = "meta"
ATTR_PARAM_NAMES = "names"
ATTR_PARAM_SHAPES = "shapes"
ATTR_QUERY_IDS = "query_ids"
ATTR_INDICES = "indices"

# dimension names (Zarr v3 dimension_names, read by xarray / dask)
DIM_CHECKPOINT = "checkpoint"
DIM_TRAIN = "train"
DIM_PROBE = "probe"
DIM_ANCHOR = "anchor"
DIM_CONDITION = "condition"
DIM_TIMESTEP = "timestep"
DIM_FEATURE = "feature"
DIM_HEIGHT, DIM_WIDTH, DIM_CHANNEL = "height", "width", "channel"
DIM_PARAMETER = "parameter"
DIM_QUERY = "query"
DIM_DIGEST = "digest"

ITEM_DIM = {TRAIN: DIM_TRAIN, ANCHORS: DIM_ANCHOR, PROBES: DIM_PROBE}

# chunking: one checkpoint per chunk (appends touch only new chunks); rows of training images
# per chunk bounded so that a chunk stays around a few MB at 512 float32 features x 2 x 3.
TRAIN_ROWS_PER_CHUNK = 1024
# Feature arrays are stored uncompressed: pooled float activations compress ~10% with zstd (demo store:
# 1.31 MiB vs 1.47 MiB raw) while decompression cut scoring reads from ~1.6 GB/s to ~0.4 GB/s here.
FEATURE_COMPRESSORS = None


def feature_path(kind: str, module: str) -> str:
    """Path of the feature array of ``module`` for ``kind`` in FEATURE_KINDS."""
    return f"{kind}/{FEATURES}/{module}"


def attribution_path(method: str, step: int, query_set: str) -> str:
    """Where the scores of one query set (``QuerySet.key``) at one step live: sets never overwrite each other."""
    return f"{ATTRIBUTION}/{method}/{int(step)}/{query_set}"

# ---------------------------------------------------------------- capture modes: snapshot vs featurized state
# A checkpoint is first a *snapshot* (checkpoints/*, lora/weights, signals/*: what exists only inside the training
# loop) and later *featurized* (*/features/*, */loss, probes/images: a deterministic function of the snapshot).
# Two writers, two markers, two zarr.json files: the training loop commits snapshots in the checkpoints group's
# attributes; the featurizer (inline, a background worker or `montrage capture`) commits featurized checkpoints
# in the root's committed_checkpoints. Readers see featurized checkpoints only.
ATTR_SNAPSHOTS = "snapshot_checkpoints"  # checkpoints group attr: snapshot commit marker
ATTR_SIGNAL_ROWS = "signal_rows"  # checkpoints group attr: committed rows of signals/* (written with the marker)
CAPTURE_LOCK_FILENAME = ".montrage.capture.lock"  # one featurizer at a time (the training loop holds LOCK_FILENAME)
CAPTURE_MODES = ("inline", "background", "deferred")
SIGNALS = "signals"  # per-step signals recorded in the loop, one row per (step, batch item)
SIGNAL_STEP = "step"  # (sample,) int64 optimizer step
SIGNAL_INDEX = "train_index"  # (sample,) int64 training image index; -1: not a training image (e.g. prior)
SIGNAL_TIMESTEP = "timestep"  # (sample,) int64 diffusion timestep drawn for it
SIGNAL_LOSS = "loss"  # (sample,) float32 its per-sample training loss (no extra forward pass)
SIGNAL_ARRAYS = ((SIGNAL_STEP, "int64"), (SIGNAL_INDEX, "int64"), (SIGNAL_TIMESTEP, "int64"), (SIGNAL_LOSS, "float32"))
DIM_SAMPLE = "sample"
SIGNAL_ROWS_PER_CHUNK = 65536

# ---------------------------------------------------------------- gradient features (`montrage featurize`)
# Projected per-sample LoRA gradients of every training image at stored checkpoints, written once (by `montrage
# featurize RUN` or on first use) and read by dtrak / tracin / the fused montrage model, so that a query costs
# its own gradients plus a product. Per output function (sqnorm = D-TRAK's, denoise = the training loss):
#   train/gradients/<output>       (checkpoint, train, timestep, projection)  float16  per-timestep unit vectors
#   train/gradient_norms/<output>  (checkpoint, train, timestep)              float32  their norms (raw = unit x norm)
# attrs of train/gradients/<output>: gradient_settings (timesteps, noise_seed, proj_dim, proj_seed,
# projection_device, lora layout) and gradient_rows {checkpoint index: rows written} (the resume marker,
# written after the rows; a checkpoint is usable once its count equals the number of training images).
GRADIENTS = "gradients"
GRADIENT_NORMS = "gradient_norms"
ATTR_GRADIENT_SETTINGS = "gradient_settings"
ATTR_GRADIENT_ROWS = "gradient_rows"
DIM_PROJECTION = "projection"
GRADIENT_DTYPE = "float16"
GRADIENT_ROWS_PER_CHUNK = 256


def gradient_path(output: str) -> str:
    return f"{TRAIN}/{GRADIENTS}/{output}"


def gradient_norm_path(output: str) -> str:
    return f"{TRAIN}/{GRADIENT_NORMS}/{output}"


def retrain_targets_path(run_dir: Path) -> Path:
    """RUN/retrains/targets.npz: the counterfactual targets of ``montrage fit --retrains`` (beside the store)."""
    return run_dir / RETRAINS_DIRNAME / RETRAIN_TARGETS_FILENAME

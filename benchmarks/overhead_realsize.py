"""``montrage bench overhead-realsize``: issue 11's two overhead ratios at Stable-Diffusion-1.5 size (GPU).

Writes a random-weights diffusers folder of SD-1.5 shape (UNet: ``benchmarks.realsize.SD15`` with 4 latent
channels; CLIP text encoder of width 768 and 12 layers; an SD-shaped VAE, 512 px; a CLIP tokenizer written
locally: nothing is downloaded), then times ``montrage.training.train(..., base=FOLDER)`` without the monitor,
with the default capture mode (background) and inline, alternated, at the default cadence, and reports

- time until the final LoRA is saved, monitored (background) / plain: target <= 1.05
- the whole ``train`` call including all capture (the worker finished) / plain: target <= 1.30

The device is what ``train`` picks (CUDA when available, else CPU); the background worker runs on the same
device (``--capture-device`` to change it: ``train()`` itself has no such parameter and would start it on the
CPU, where an SD-1.5 checkpoint takes far longer than training). ``--small`` shrinks every part (16 px)
so the whole thing runs on a CPU in seconds (tests). Results are rewritten after every run, so a run cut
short by a time limit still leaves the finished ones.

    python -m benchmarks.overhead_realsize [--small] [--out DIR] [--steps N] [--every K] [--repeats R]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

ORDER = ("plain", "background", "inline")  # alternated in this order; background is train()'s default
TARGETS = {"lora_saved": 1.05, "total": 1.30}
TEXT_MAX_LENGTH = 77
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


# ----------------------------------------------------------------------------- the base folder
def _vocab_and_merges():
    """A small byte-level BPE vocabulary (lowercase letters, digits, caption punctuation, a few merges):
    enough for the synthetic captions; the text encoder's cost does not depend on the vocabulary size."""
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789-.,!'")
    merges = ["b y</w>", "a r", "ar t", "art i", "arti s", "artis t"]
    tokens = list(SPECIAL) + chars + [c + "</w>" for c in chars] + ["".join(m.split(" ")) for m in merges]
    return {tok: i for i, tok in enumerate(dict.fromkeys(tokens))}, merges


def write_tokenizer(folder: Path, max_length: int = TEXT_MAX_LENGTH) -> int:
    """vocab.json + merges.txt + tokenizer_config.json, as in an SD-1.5 checkout's tokenizer/; returns the
    vocabulary size. (The tests' tiny pipelines write theirs with this too.)"""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _vocab_and_merges()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": max_length, "bos_token": SPECIAL[0],
        "eos_token": SPECIAL[1], "pad_token": SPECIAL[1], "unk_token": SPECIAL[1], "do_lower_case": True}))
    return len(vocab)


def part_configs(small: bool) -> Dict[str, dict]:
    """Constructor arguments of the UNet, CLIP text encoder and VAE: SD-1.5's, or tiny ones (``small``)."""
    from benchmarks.realsize import SD15

    if small:
        unet = dict(block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=16, attention_head_dim=4,
                    down_block_types=("CrossAttnDownBlock2D",) * 2, up_block_types=("CrossAttnUpBlock2D",) * 2,
                    sample_size=8, norm_num_groups=4)
        text = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                    projection_dim=16)
        vae = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=16,
                   down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    else:  # SD-1.5: UNet 64x64 latents, CLIP ViT-L/14 text tower, the SD VAE (factor 8 -> 512 px)
        unet = dict(SD15)
        text = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    projection_dim=768, hidden_act="quick_gelu")
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    unet.update(in_channels=4, out_channels=4)
    text.update(max_position_embeddings=TEXT_MAX_LENGTH, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    vae.update(in_channels=3, out_channels=3, latent_channels=4)
    return {"unet": unet, "text_encoder": text, "vae": vae}


def write_base_folder(root: Path, small: bool = False, seed: int = 0) -> Path:
    """A diffusers pipeline folder (unet/, text_encoder/, tokenizer/, scheduler/, vae/) with random weights;
    reused when ``root`` already holds one written with the same configuration (the SD-size one is ~4 GB)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(root)
    cfgs = part_configs(small)
    stamp = json.dumps({"configs": cfgs, "seed": seed}, sort_keys=True, default=list)
    marker = root / "montrage_bench_base.json"
    if marker.is_file() and marker.read_text() == stamp:
        return root
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    vocab_size = write_tokenizer(root / "tokenizer")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        UNet2DConditionModel(**cfgs["unet"]).save_pretrained(root / "unet")
        CLIPTextModel(CLIPTextConfig(vocab_size=vocab_size, **cfgs["text_encoder"])).save_pretrained(
            root / "text_encoder")
        AutoencoderKL(**cfgs["vae"]).save_pretrained(root / "vae")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="epsilon", clip_sample=False).save_pretrained(root / "scheduler")
    marker.write_text(stamp)  # last: a folder cut short is rebuilt next time
    return root


def base_resolution(small: bool) -> int:
    cfgs = part_configs(small)
    return int(cfgs["unet"]["sample_size"]) * 2 ** (len(cfgs["vae"]["block_out_channels"]) - 1)


# ----------------------------------------------------------------------------- timing
@contextlib.contextmanager
def capture_device(device: str):
    """Start the background worker on ``device``: ``train()`` has no parameter for it (its worker runs on the
    CPU), and an SD-1.5 capture on one CPU thread takes far longer than the training it follows."""
    from montrage.callbacks.monitor import TrainingMonitor

    if device == "cpu":
        yield
        return
    original = TrainingMonitor.configure_capture

    def configure(self, mode="background", threads=1, **kw):
        kw.setdefault("device", device)
        return original(self, mode, threads=threads, **kw)

    TrainingMonitor.configure_capture = configure
    try:
        yield
    finally:
        TrainingMonitor.configure_capture = original


def timed_training(data: Path, out: Path, base: Path, steps: int, every: int, mode: Optional[str],
                   capture_threads: Optional[int] = 1, seed: int = 0, worker_device: str = "cpu") -> Dict[str, float]:
    """One fresh run on ``base``; ``mode`` None = no monitor. Seconds until the final LoRA was saved, and in
    all (the ``train`` call, background capture finished)."""
    from benchmarks.overhead import cpu_stall_us
    from montrage.config import CaptureConfig, TrainConfig
    from montrage.training import train

    shutil.rmtree(out, ignore_errors=True)
    stall0 = cpu_stall_us()
    t0 = time.perf_counter()
    with capture_device(worker_device):
        res = train(data, out, base=str(base), cfg=TrainConfig(steps=steps, prior_fraction=0.0, seed=seed),
                    capture=CaptureConfig(every_n_steps=every), monitor=mode is not None, progress=False,
                    capture_mode=mode or "inline", capture_threads=capture_threads)
    total = time.perf_counter() - t0
    stall1 = cpu_stall_us()
    setup = total - res.wall_time_s  # loading the base, creating the store: before the first step
    return {"total_s": total, "lora_saved_s": setup + float(res.lora_saved_s), "setup_s": setup,
            "cpu_stall": float("nan") if stall0 is None or stall1 is None else (stall1 - stall0) / 1e6 / total}


def summarize(res: Dict[str, object]) -> Dict[str, object]:
    """Medians per mode and the ratios to plain, from the runs finished so far."""
    runs: Dict[str, List[Dict[str, float]]] = res["runs"]
    med = {m: {k: float(np.median([x[k] for x in v])) for k in v[0]} for m, v in runs.items() if v}
    res["median"] = med
    if "plain" in med:
        p = med["plain"]
        res["ratios"] = {m: {"lora_saved": med[m]["lora_saved_s"] / p["lora_saved_s"],
                             "total": med[m]["total_s"] / p["total_s"]} for m in med if m != "plain"}
    return res


def measure(root: Path, small: bool, steps: int, every: Optional[int], repeats: int,
            capture_threads: Optional[int] = 1, base: Optional[Path] = None, modes=ORDER,
            worker_device: Optional[str] = None) -> Dict[str, object]:
    import torch

    from montrage.config import CaptureConfig
    from montrage.data.synthetic import OBJECTS, write_concept_dataset

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    every = every or CaptureConfig().every_n_steps
    t0 = time.perf_counter()
    base = write_base_folder(Path(base) if base else root / ("base-small" if small else "base-sd15"), small=small)
    base_write_s = time.perf_counter() - t0
    resolution = base_resolution(small)
    data = write_concept_dataset(root / f"data-{resolution}", n_artists=3, images_per_artist=2 if small else 4,
                                 objects=OBJECTS[:1], seed=0, resolution=resolution)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    worker_device = worker_device or device  # the issue: "on GPU a separate stream or another device"
    res: Dict[str, object] = {
        "small": small, "device": device, "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "base": str(base), "resolution": resolution, "parts": part_configs(small), "base_write_s": base_write_s,
        "steps": steps, "every_n_steps": every, "checkpoints": len(set(range(0, steps, every)) | {steps}),
        "repeats": repeats, "capture_threads": capture_threads,
        "capture_worker_device": worker_device,  # train() alone would start it on the CPU (no device option)
        "runs": {m: [] for m in modes}}
    for r in range(repeats):
        for mode in modes:
            res["runs"][mode].append(timed_training(data, root / f"run-{mode}{r}", base, steps, every,
                                                    None if mode == "plain" else mode, capture_threads,
                                                    worker_device=worker_device))
            summarize(res)
            (root / "results.json").write_text(json.dumps(res, indent=2, default=float))
    return res


def markdown(res: Dict[str, object]) -> str:
    med, ratios = res.get("median", {}), res.get("ratios", {})
    size = "tiny (--small)" if res["small"] else "SD-1.5-shaped (random weights)"
    lines = [f"{size} base at {res['resolution']} px on {res['gpu'] or res['device']}; {res['steps']} steps, a "
             f"checkpoint every {res['every_n_steps']} ({res['checkpoints']} checkpoints), medians of "
             f"{res['repeats']} alternated run(s); background worker on {res['capture_worker_device']} with "
             f"{res['capture_threads']} thread(s).", "",
             "| mode | final LoRA saved s | whole train call s | LoRA saved / plain | whole / plain |",
             "|---|---|---|---|---|"]
    for m in ORDER:
        if m not in med:
            continue
        r = ratios.get(m, {"lora_saved": 1.0, "total": 1.0})
        name = {"plain": "no monitor", "background": "background (default)"}.get(m, m)
        lines.append(f"| {name} | {med[m]['lora_saved_s']:.1f} | {med[m]['total_s']:.1f} | {r['lora_saved']:.3f} | "
                     f"{r['total']:.3f} |")
    b = ratios.get("background")
    if b:
        lines += ["", f"Targets: LoRA saved / plain {b['lora_saved']:.3f} (<= {TARGETS['lora_saved']}: "
                  f"{'met' if b['lora_saved'] <= TARGETS['lora_saved'] else 'missed'}); whole train call / plain "
                  f"{b['total']:.3f} (<= {TARGETS['total']}: {'met' if b['total'] <= TARGETS['total'] else 'missed'})."]
    else:
        lines += ["", "Targets: not measured (no finished background run)."]
    return "\n".join(lines)


def run_overhead_realsize(args) -> int:
    """``montrage bench overhead-realsize [--quick]``: --quick = --small with a few steps."""
    from benchmarks.cli import provenance_lines, write_md_section

    quick = bool(getattr(args, "quick", False))
    small = quick or bool(getattr(args, "small", False))
    root = Path(args.out) / ("overhead-realsize-quick" if quick else "overhead-realsize" + ("-small" if small else ""))
    steps = getattr(args, "steps", None) or (4 if quick else 200)
    every = getattr(args, "every", None) or (2 if quick else None)
    repeats = getattr(args, "repeats", None) or 1
    res = measure(root, small, steps, every, repeats, capture_threads=getattr(args, "capture_threads", 1),
                  worker_device=getattr(args, "capture_device", None))
    md = markdown(res)
    print(md)
    if getattr(args, "write_md", None):
        heading = "## Callback overhead at SD-1.5 size" + (" (--quick)" if quick else " (--small)" if small else "")
        body = "\n".join([heading, "", provenance_lines(args, "data 0, training 0, base weights 0"), "", md])
        print(f"wrote section 'overhead-realsize' of {write_md_section('overhead-realsize', body, args.write_md)}")
    return 0


def main(argv: Optional[list] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead_realsize", description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny parts (16 px): runs on a CPU in seconds")
    ap.add_argument("--out", default="bench-out")
    ap.add_argument("--steps", type=int, default=None, help="training steps (default 200)")
    ap.add_argument("--every", type=int, default=None, help="checkpoint cadence (default: CaptureConfig's, 100)")
    ap.add_argument("--repeats", type=int, default=None, help="alternated runs per mode (default 1)")
    ap.add_argument("--capture-threads", type=int, default=1, help="background worker's CPU threads (train's default 1)")
    ap.add_argument("--capture-device", default=None,
                    help="background worker's device (default: the training device; train() alone uses the CPU)")
    ap.add_argument("--write-md", default=None, metavar="PATH", help="(re)write the overhead-realsize section of PATH")
    args = ap.parse_args(argv)
    args.kind, args.quick, args.seed = "overhead-realsize", False, 0
    return run_overhead_realsize(args)


if __name__ == "__main__":
    raise SystemExit(main())

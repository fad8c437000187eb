"""``montrage bench overhead``: what the monitor costs training, per capture mode, measured side by side.

One process, the same data, steps, cadence and seed; runs alternated (plain, background, inline, ...) so that
a change in machine load hits every mode alike. Reported ratios (targets from issue 11):

- time until the final LoRA is saved, monitored (default mode) / plain: <= 1.05
- the whole ``train`` call including all capture (the background worker finished) / plain: <= 1.30
- deferred: ``montrage capture --num-processes 2`` vs 1 process on the same snapshots (faster is the target)

plus a per-item breakdown of one checkpoint's capture (seconds per training image, anchor and probe), which
``bench cost`` reports too.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

MODES = ("background", "inline", "deferred")


def cpu_stall_us() -> Optional[float]:
    """Microseconds some runnable task waited for a CPU since boot (Linux PSI), or None: over a timed run,
    its increase / the run's wall time says how busy the machine was (0: idle; 1: always someone waiting)."""
    try:
        return float(Path("/proc/pressure/cpu").read_text().split()[4].split("=")[1])
    except (OSError, IndexError, ValueError):
        return None


def _stall(before: Optional[float], seconds: float) -> float:
    after = cpu_stall_us()
    return float("nan") if before is None or after is None else (after - before) / 1e6 / max(seconds, 1e-9)


def timed_training(data: Path, out: Path, steps: int, every: int, prior: Optional[Path], mode: Optional[str],
                   seed: int = 0) -> Dict[str, float]:
    """One fresh run; ``mode`` None = no monitor. Seconds until the final LoRA was saved, and in all."""
    from montrage.config import CaptureConfig, TrainConfig
    from montrage.training import train

    shutil.rmtree(out, ignore_errors=True)
    stall0 = cpu_stall_us()
    t0 = time.perf_counter()
    res = train(data, out, cfg=TrainConfig(steps=steps, prior_fraction=0.25 if prior else 0.0, seed=seed),
                capture=CaptureConfig(every_n_steps=every), prior_dir=prior, monitor=mode is not None,
                progress=False, capture_mode=mode or "inline")
    total = time.perf_counter() - t0
    setup = total - res.wall_time_s  # model loading, store creation: before the first step
    return {"total_s": total, "lora_saved_s": setup + float(res.lora_saved_s), "setup_s": setup,
            "cpu_stall": _stall(stall0, total)}


def timed_capture(run: Path, copy_to: Path, processes: int) -> Dict[str, float]:
    """Wall seconds of the command the target names, ``montrage capture COPY --num-processes N``, in a fresh
    process (its start-up, importing torch and rebuilding the base, counts as much as its helpers')."""
    import subprocess
    import sys

    from montrage.storage import RunStore

    shutil.rmtree(copy_to, ignore_errors=True)
    shutil.copytree(run, copy_to)
    pending = len(RunStore.open(copy_to).pending_steps)
    stall0 = cpu_stall_us()
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "montrage.cli", "--quiet", "capture", str(copy_to), "--num-processes",
                    str(processes)], check=True, stdin=subprocess.DEVNULL)
    seconds = time.perf_counter() - t0
    stall = _stall(stall0, seconds)
    st = RunStore.open(copy_to)
    if pending == 0 or st.pending_steps or st.n_checkpoints != st.n_snapshots:
        raise RuntimeError(f"capture of {copy_to} left {st.pending_steps} pending of {pending}")
    return {"s": seconds, "cpu_stall": stall}


def capture_breakdown(run: Path, repeats: int = 1) -> Dict[str, float]:
    """Seconds of one checkpoint's capture per item (1 CPU thread, the capture engine on the run's last
    snapshot): training images and anchors per image (all conditions and timesteps), probes per probe
    (generation + featurization)."""
    from montrage.callbacks.capture import CaptureEngine, lora_layout, rebuild_components, unflatten
    from montrage.callbacks.probes import run_probes
    from montrage.models.features import TRAIN_SEED_OFFSET
    from montrage.models.sampling import generate
    from montrage.storage import RunStore

    store = RunStore.open(run)
    engine = CaptureEngine.from_store(store, rebuild_components(store))
    snap = store.read_snapshot(store.n_snapshots - 1)
    names, shapes = lora_layout(store)
    cap = engine.capture
    out: Dict[str, float] = {"conditions": len(cap.conditions), "timesteps": len(cap.timesteps),
                             "probe_steps": cap.probe_steps, "probe_sampler": cap.probe_sampler}
    with engine.lora_weights(unflatten(snap.lora, names, shapes)):
        from montrage.callbacks.capture import torch_threads

        with torch_threads(engine.threads):
            n = len(engine.captions)
            t0 = time.perf_counter()
            for _ in range(repeats):
                engine._extract(list(range(n)), TRAIN_SEED_OFFSET)
            out["train_image_s"] = (time.perf_counter() - t0) / repeats / max(n, 1)
            if len(cap.conditions) > 1:  # what the caption condition costs (scorers reading it: see the README)
                from dataclasses import replace

                from montrage.models.features import FeatureExtractor

                null_only = FeatureExtractor(engine.components, replace(cap, conditions=("null",)))
                images = engine.read_images(list(range(n)))
                t0 = time.perf_counter()
                for _ in range(repeats):
                    null_only.extract(images, [""] * n, list(range(n)))
                out["train_image_null_only_s"] = (time.perf_counter() - t0) / repeats / max(n, 1)
            probes = engine.probes
            idx = list(range(len(probes)))
            t0 = time.perf_counter()
            for _ in range(repeats):
                generate(engine.components, [p.prompt for p in probes], [p.seed for p in probes],
                         num_steps=cap.probe_steps, guidance_scale=cap.guidance_scale, sampler=cap.probe_sampler)
            out["probe_generation_s"] = (time.perf_counter() - t0) / repeats / max(len(probes), 1)
            t0 = time.perf_counter()
            for _ in range(repeats):
                run_probes(engine.components, engine.extractor, probes, idx, cap)
            out["probe_s"] = (time.perf_counter() - t0) / repeats / max(len(probes), 1)
            t0 = time.perf_counter()
            for _ in range(repeats):
                generate(engine.components, [p.prompt for p in probes], [p.seed for p in probes], num_steps=25,
                         guidance_scale=cap.guidance_scale, sampler="ddim")
            out["probe_generation_ddim25_s"] = (time.perf_counter() - t0) / repeats / max(len(probes), 1)
    out["train_images"], out["anchors"], out["probes"] = n, len(engine.anchor_indices), len(probes)
    out["checkpoint_s"] = out["train_image_s"] * (n + out["anchors"]) + out["probe_s"] * len(probes)
    return out


def measure_overhead(root: Path, steps: int = 400, every: Optional[int] = None, repeats: int = 2,
                     modes=MODES) -> Dict[str, object]:
    from montrage.config import CaptureConfig
    from montrage.data.synthetic import write_concept_dataset, write_prior_dataset

    every = every or CaptureConfig().every_n_steps
    data = write_concept_dataset(root / "data", n_artists=3, images_per_artist=8, seed=0)
    prior = write_prior_dataset(root / "prior", 32, seed=1)
    runs: Dict[str, List[Dict[str, float]]] = {"plain": [], **{m: [] for m in modes}}
    for r in range(repeats):
        for mode in ("plain",) + tuple(modes):
            if mode == "deferred" and r:
                continue  # one deferred run gives the snapshots both capture timings use
            runs[mode].append(timed_training(data, root / f"{mode}{r}", steps, every, prior,
                                             None if mode == "plain" else mode))
    med = {m: {k: float(np.median([x[k] for x in v])) for k in v[0]} for m, v in runs.items() if v}
    res: Dict[str, object] = {"steps": steps, "every_n_steps": every, "checkpoints": steps // every + 1,
                              "repeats": repeats, "runs": runs, "median": med}
    plain = med["plain"]
    res["ratios"] = {m: {"lora_saved": med[m]["lora_saved_s"] / plain["lora_saved_s"],
                         "total": med[m]["total_s"] / plain["total_s"]} for m in modes}
    if "deferred" in modes:
        one, two = [], []
        for r in range(repeats):  # alternated, like the training runs
            one.append(timed_capture(root / "deferred0", root / f"capture1-{r}", 1))
            two.append(timed_capture(root / "deferred0", root / f"capture2-{r}", 2))
        t1, t2 = float(np.median([x["s"] for x in one])), float(np.median([x["s"] for x in two]))
        res["deferred_capture"] = {"one_process_s": t1, "two_processes_s": t2, "speedup": t1 / t2,
                                   "runs_one": one, "runs_two": two}
    featurized = root / f"{[m for m in modes if m != 'deferred'][0]}0" if set(modes) - {"deferred"} else root / "capture1-0"
    res["capture_breakdown"] = capture_breakdown(featurized)
    res["timestep_signal"] = timestep_signal(featurized)
    return res


def timestep_signal(run: Path) -> Dict[str, Dict[str, float]]:
    """Which captured timesteps carry attribution signal: between-concept top-1 accuracy of the run's
    single-concept probes when each is matched (cosine of z-normalised features, null condition, last
    checkpoint) to its nearest training image using one module at one timestep."""
    from montrage.storage import RunStore
    from montrage.storage import schema as S

    st = RunStore.open(run)
    concepts = np.asarray(st.concepts)
    expected = np.asarray(st.probe_meta.get(S.ATTR_CONCEPTS, []))
    keep = np.flatnonzero([bool(c) and c in set(concepts) for c in expected])
    c = st.conditions.index("null")
    out: Dict[str, Dict[str, float]] = {}
    for m in st.modules:
        tr = st.features(S.TRAIN, m, -1)[:, c]  # (n, T, F)
        pr = st.features(S.PROBES, m, -1)[keep, c]
        for ti, t in enumerate(st.timesteps):
            mu, sd = tr[:, ti].mean(0), tr[:, ti].std(0) + 1e-6
            a = (tr[:, ti] - mu) / sd
            b = (pr[:, ti] - mu) / sd
            a /= np.linalg.norm(a, axis=1, keepdims=True) + 1e-12
            b /= np.linalg.norm(b, axis=1, keepdims=True) + 1e-12
            top = (b @ a.T).argmax(1)
            out.setdefault(m, {})[str(t)] = float((concepts[top] == expected[keep]).mean()) if len(keep) else float("nan")
    return out


def overhead_markdown(res: Dict[str, object]) -> str:
    med, ratios = res["median"], res["ratios"]
    plain = med["plain"]
    lines = [f"{res['steps']} steps, a checkpoint every {res['every_n_steps']} ({res['checkpoints']} checkpoints), "
             f"medians of {res['repeats']} alternated runs (deferred: 1).", "",
             "| mode | final LoRA saved s | whole train call s | LoRA saved / plain | whole / plain | CPU stall |",
             "|---|---|---|---|---|---|",
             f"| no monitor | {plain['lora_saved_s']:.1f} | {plain['total_s']:.1f} | 1.000 | 1.000 | "
             f"{plain.get('cpu_stall', float('nan')):.2f} |"]
    for m, r in ratios.items():
        note = " (default)" if m == "background" else (" (snapshots only)" if m == "deferred" else "")
        lines.append(f"| {m}{note} | {med[m]['lora_saved_s']:.1f} | {med[m]['total_s']:.1f} | "
                     f"{r['lora_saved']:.3f} | {r['total']:.3f} | {med[m].get('cpu_stall', float('nan')):.2f} |")
    lines += ["", "CPU stall: the share of a run's wall time during which some task on the machine waited for a CPU "
              "(Linux PSI `cpu some`, median over the runs): about 0 on an idle machine; higher values mean other "
              "work competed for the 2 cores during that run."]
    if "background" in ratios:
        b = ratios["background"]
        lines += ["", f"Targets: LoRA saved / plain {b['lora_saved']:.3f} (<= 1.05: "
                  f"{'met' if b['lora_saved'] <= 1.05 else 'missed'}); whole train call / plain {b['total']:.3f} "
                  f"(<= 1.30: {'met' if b['total'] <= 1.30 else 'missed'})."]
    d = res.get("deferred_capture")
    if d:
        def stalls(runs: List[Dict[str, float]]) -> str:
            return ", ".join(f"{x.get('cpu_stall', float('nan')):.2f}" for x in runs if isinstance(x, dict))

        lines += ["", f"Deferred: the command `montrage capture RUN` of the {res['checkpoints']} snapshots (a fresh "
                  f"process each time, start-up included) took {d['one_process_s']:.1f} s on 1 process and "
                  f"{d['two_processes_s']:.1f} s with `--num-processes 2`: x{d['speedup']:.2f} (target: faster than 1 "
                  f"process, {'met' if d['speedup'] > 1 else 'missed'}; CPU stall during the runs: 1 process "
                  f"{stalls(d['runs_one'])}, 2 processes {stalls(d['runs_two'])})."]
    lines += ["", capture_breakdown_markdown(res["capture_breakdown"])]
    ts = res.get("timestep_signal")
    if ts:
        steps = list(next(iter(ts.values())))
        lines += ["", "Which timesteps carry signal: between-concept top-1 of the single-concept probes matched to "
                  "their nearest training image by one module at one timestep (null condition, last checkpoint):", "",
                  "| module | " + " | ".join(f"t={t}" for t in steps) + " |", "|---" * (len(steps) + 1) + "|"]
        lines += [f"| {m} | " + " | ".join(f"{v[t]:.2f}" for t in steps) + " |" for m, v in ts.items()]
    return "\n".join(lines)


def capture_breakdown_markdown(b: Dict[str, float]) -> str:
    null = (f"; the null condition alone {1000 * b['train_image_null_only_s']:.1f} ms"
            if "train_image_null_only_s" in b else "")
    return (f"Capture per checkpoint (1 CPU thread): {b['checkpoint_s']:.2f} s = {b['train_images']} training "
            f"images + {b['anchors']} anchors x {1000 * b['train_image_s']:.1f} ms each ({b['conditions']} "
            f"condition(s) x {b['timesteps']} timesteps{null}) + {b['probes']} probes x {1000 * b['probe_s']:.1f} ms "
            f"each ({b['probe_sampler']} {b['probe_steps']} steps: generation {1000 * b['probe_generation_s']:.1f} ms; "
            f"with DDIM 25 steps the generation took {1000 * b['probe_generation_ddim25_s']:.1f} ms).")


def run_overhead(args) -> int:
    from benchmarks.cli import provenance_lines, write_md_section

    root = Path(args.out) / ("overhead-quick" if args.quick else "overhead")
    repeats = getattr(args, "repeats", None) or (1 if args.quick else 2)  # a driver may set fewer on a busy machine
    res = measure_overhead(root, steps=100 if args.quick else 400, every=25 if args.quick else None, repeats=repeats)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(res, indent=2, default=float))
    md = overhead_markdown(res)
    print(md)
    if args.write_md:
        heading = "## Callback overhead by capture mode" + (" (--quick)" if args.quick else "")
        stalls = [x.get("cpu_stall", float("nan")) for v in res["runs"].values() for x in v]
        stalls += [x.get("cpu_stall", float("nan")) for key in ("runs_one", "runs_two")
                   for x in res.get("deferred_capture", {}).get(key, [])]
        worst = max((x for x in stalls if x == x), default=float("nan"))
        note = ((f"- note: other work competed for the 2 CPU cores during some runs (CPU stall up to {worst:.2f} of "
                 "a run's wall time, see the table); the ratios compare runs alternated in one process, so shared "
                 "load hits every mode alike, but they are noisy" if worst > 0.05 else
                 f"- note: the machine was otherwise idle (CPU stall at most {worst:.2f} of a run's wall time)")
                + (f"; {repeats} repeat(s) instead of the default 2 (args.repeats), to fit the time the machine had"
                   if repeats != 2 else ""))
        write_md_section("overhead", "\n".join([heading, "", provenance_lines(args, "training 0"), note, "", md]),
                         args.write_md)
    return 0

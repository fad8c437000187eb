"""Scale benchmark: a 200,000-image run store, attribution memory, and store throughput.

``python -m benchmarks.scale [--n-train 200000] [--checkpoints 20] [--dim 512] [--out DIR] [--write-md]``

1. **Build** a synthetic run store through :meth:`RunStore.append` (one checkpoint at a time, as the
   monitor writes it): ``n_train`` training images, ``checkpoints`` checkpoints, one module of ``dim``
   float16 features (``StoreDims.feature_dtype='float16'``), one condition ('null') and one timestep,
   ``probes`` probes, 64 anchors, concept structure (images drift towards their concept over checkpoints).
2. **Memory**: ``montrage attribute`` for the store's probes (query mode A) with each method, each in a
   fresh subprocess (``python -m benchmarks.scale score RUN --method M``), which reports its own peak
   RSS (``VmHWM``; the parent also samples it with psutil every 0.1 s). Target < 2 GB.
3. **Throughput**: write and read MB/s of the store's feature layout (checkpoint x train x 1 x 1 x dim,
   float16, one checkpoint per chunk along axis 0) for chunk rows 1024 / 8192 and codecs zstd (Zarr's
   default, level 0) / none / blosc-lz4 (byte shuffle), against raw numpy ``.npy`` files of the same
   data. Writes are timed to the page cache (no fsync, for both); reads are timed cold (files fsynced
   and dropped from the page cache with posix_fadvise(DONTNEED), our files only) and warm.

Too big for the default test suite; tests/analysis/test_dask_scoring.py has a @slow 20,000-image version.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
MD_TAG = "scale"
MODULE = "mid_block"
RSS_TARGET_MB = 2048


# ---------------------------------------------------------------------------------------------- build
def _features(base: np.ndarray, concept_dir: np.ndarray, concept: np.ndarray, k: int, K: int,
              rng: np.random.Generator) -> np.ndarray:
    """(n, 1, 1, F) float32: image base + drift towards its concept + per-checkpoint noise."""
    x = base + (k / max(1, K - 1)) * concept_dir[concept]
    x += 0.2 * rng.standard_normal(base.shape, dtype=np.float32)
    return x[:, None, None, :]


def build_store(run: Path, n_train: int = 200_000, checkpoints: int = 20, dim: int = 512, probes: int = 64,
                anchors: int = 64, concepts: int = 100, dtype: str = "float16", seed: int = 0,
                progress: bool = True) -> Dict[str, Any]:
    """Write the synthetic store checkpoint by checkpoint through RunStore.append; returns timings."""
    from montrage.storage import CheckpointRecord, RunStore, StoreDims
    from montrage.storage import schema as S

    if run.exists():
        shutil.rmtree(run)
    rng = np.random.default_rng(seed)
    concept = np.arange(n_train) % concepts
    names = [f"img_{i:07d}.png" for i in range(n_train)]
    cnames = [f"concept-{c:03d}" for c in concept]
    anchor_idx = sorted({int(i) for i in np.linspace(0, n_train - 1, anchors).round()})
    pconcept = np.arange(probes) % concepts
    dims = StoreDims(n_train=n_train, n_probes=probes, n_anchors=len(anchor_idx), n_conditions=1, n_timesteps=1,
                     feature_dims={MODULE: dim}, image_shape=(16, 16, 3), lora_names=["lora.A"], lora_shapes=[[256]],
                     feature_dtype=dtype)
    run_config = {"capture": {"modules": [MODULE], "conditions": ["null"], "timesteps": [400]},
                  "base": "embedded", "resolution": 16, "synthetic": "benchmarks.scale"}
    train_meta = {S.ATTR_FILE_NAMES: names, S.ATTR_CAPTIONS: [f"an image by {c}" for c in cnames],
                  S.ATTR_CONCEPTS: cnames, S.ATTR_EXTRA: [{}] * n_train, S.ATTR_DATASET_FINGERPRINT: f"synthetic-{seed}"}
    probe_meta = {S.ATTR_PROMPTS: [f"an image by concept-{c:03d}" for c in pconcept],
                  S.ATTR_SEEDS: list(range(probes)), S.ATTR_CONCEPTS: [f"concept-{c:03d}" for c in pconcept],
                  S.ATTR_KINDS: ["between"] * probes, S.ATTR_META: [{}] * probes}
    base = rng.standard_normal((n_train, dim), dtype=np.float32)
    concept_dir = 1.5 * rng.standard_normal((concepts, dim), dtype=np.float32)
    pbase = rng.standard_normal((probes, dim), dtype=np.float32)
    t_gen = t_write = 0.0
    t0 = time.perf_counter()
    with RunStore.create_or_resume(run, run_config, {"synthetic": seed}, dims, train_meta, probe_meta, anchor_idx) as st:
        t_create = time.perf_counter() - t0
        for k in range(checkpoints):
            a = time.perf_counter()
            train = _features(base, concept_dir, concept, k, checkpoints, rng).astype(dtype)
            rec = CheckpointRecord(
                step=100 * k, wall_time=float(k), train_loss=float(1.0 / (k + 1)),
                features={S.TRAIN: {MODULE: train}, S.ANCHORS: {MODULE: train[anchor_idx]},
                          S.PROBES: {MODULE: _features(pbase, concept_dir, pconcept, k, checkpoints, rng)}},
                losses={S.TRAIN: (rng.random((n_train, 1, 1), dtype=np.float32) / (k + 1)),
                        S.ANCHORS: rng.random((len(anchor_idx), 1, 1), dtype=np.float32) / (k + 1),
                        S.PROBES: rng.random((probes, 1, 1), dtype=np.float32) / (k + 1)},
                probe_images=rng.integers(0, 255, (probes, 16, 16, 3), dtype=np.uint8),
                lora=rng.standard_normal(256, dtype=np.float32))
            b = time.perf_counter()
            st.append(rec)
            c = time.perf_counter()
            t_gen += b - a
            t_write += c - b
            if progress:
                print(f"  checkpoint {k + 1}/{checkpoints} appended in {c - b:.1f} s", flush=True)
    raw_mb = n_train * checkpoints * dim * np.dtype(dtype).itemsize / 1e6
    return {"n_train": n_train, "checkpoints": checkpoints, "dim": dim, "dtype": dtype, "probes": probes,
            "concepts": concepts, "create_s": round(t_create, 2), "generate_s": round(t_gen, 1),
            "append_s": round(t_write, 1), "train_features_raw_mb": round(raw_mb, 1),
            "append_mb_per_s": round(raw_mb / t_write, 1), "store_mb_on_disk": round(_du(RunStore.store_path(run)) / 1e6, 1)}


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


# ---------------------------------------------------------------------------------------------- memory
def score_child(run: str, method: str, scheduler: Optional[str], out: str) -> Dict[str, Any]:
    """Inside the measured subprocess: `montrage attribute` through the CLI, then our own peak RSS."""
    from montrage.cli import main

    t0 = time.perf_counter()
    argv = ["--quiet", "attribute", run, "--method", method, "--query-mode", "A", "--out", out, "--show", "0"]
    if scheduler:
        argv += ["--scheduler", scheduler]
    rc = main(argv)
    return {"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_kb() / 1024, 1)}


def peak_rss_kb() -> float:
    """This process's peak RSS: VmHWM of /proc/self/status (its own address space since exec).

    Not getrusage's ru_maxrss: Linux carries that over fork + exec, so a child spawned by a large parent
    reports the parent's size.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    except OSError:
        pass
    import resource

    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def measure_scoring(run: Path, method: str, scheduler: Optional[str] = None, timeout: float = 1800) -> Dict[str, Any]:
    """Run score_child in a fresh subprocess; peak RSS as it reports it and as psutil sampled it."""
    import psutil

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = run / f"scale_{method}{'_' + scheduler if scheduler else ''}.json"
    cmd = [sys.executable, "-m", "benchmarks.scale", "score", str(run), "--method", method, "--json-out", str(out)]
    if scheduler:
        cmd += ["--scheduler", scheduler]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=str(REPO_ROOT))
    ps = psutil.Process(proc.pid)
    sampled = 0
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        try:
            rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
            sampled = max(sampled, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    if proc.poll() is None:
        proc.kill()
    stdout, stderr = proc.communicate()
    try:
        res = json.loads(stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        res = {"rc": proc.returncode, "error": stderr.decode(errors="replace")[-2000:]}
    res.update(method=method, scheduler=scheduler or "in-process", sampled_peak_rss_mb=round(sampled / 2 ** 20, 1))
    return res


# ---------------------------------------------------------------------------------------------- throughput
def _codec(name: str):
    import zarr.codecs as zc

    if name == "zstd":
        return "auto"  # Zarr's default for numeric data: ZstdCodec(level=0)
    if name == "none":
        return None
    if name == "blosc-lz4":
        return zc.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=2)
    raise ValueError(name)


def _evict(path: Path) -> None:
    """fsync our files and drop them from the page cache (cold reads), touching nothing else."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def throughput(workdir: Path, n_rows: int = 200_000, checkpoints: int = 4, dim: int = 512,
               configs: Optional[List[tuple]] = None, progress: bool = True) -> List[Dict[str, Any]]:
    """MB/s of writing and reading `checkpoints` x (n_rows, 1, 1, dim) float16 blocks, zarr vs .npy."""
    import zarr

    configs = configs or [("zstd", 1024), ("zstd", 8192), ("none", 1024), ("none", 8192),
                          ("blosc-lz4", 1024), ("blosc-lz4", 8192)]
    rng = np.random.default_rng(0)
    base = rng.standard_normal((n_rows, dim), dtype=np.float32)
    blocks = [(base + 0.3 * k + 0.2 * rng.standard_normal((n_rows, dim), dtype=np.float32)).astype(np.float16)[:, None, None, :]
              for k in range(checkpoints)]
    mb = sum(b.nbytes for b in blocks) / 1e6
    rows = []
    workdir.mkdir(parents=True, exist_ok=True)

    def timed_reads(read, path: Path) -> tuple[float, float]:
        """Best of 2 cold reads (evicted before each) and best of 2 warm reads: the machine is shared."""
        cold = warm = float("inf")
        for _ in range(2):
            _evict(path)
            t = time.perf_counter()
            read()
            cold = min(cold, time.perf_counter() - t)
        for _ in range(2):
            t = time.perf_counter()
            read()
            warm = min(warm, time.perf_counter() - t)
        return cold, warm

    # raw numpy, one .npy per checkpoint
    d = workdir / "npy"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    t = time.perf_counter()
    for k, b in enumerate(blocks):
        np.save(d / f"{k}.npy", b)
    w = time.perf_counter() - t

    def read_npy():
        for k in range(checkpoints):
            np.load(d / f"{k}.npy")
    cold, warm = timed_reads(read_npy, d)
    rows.append({"format": "numpy .npy", "chunk_rows": "-", "write_mb_s": mb / w, "read_cold_mb_s": mb / cold,
                 "read_warm_mb_s": mb / warm, "disk_mb": _du(d) / 1e6})
    shutil.rmtree(d)
    for codec, chunk_rows in configs:
        d = workdir / f"zarr-{codec}-{chunk_rows}"
        shutil.rmtree(d, ignore_errors=True)
        arr = zarr.create_array(d, shape=(0, n_rows, 1, 1, dim), chunks=(1, chunk_rows, 1, 1, dim), dtype="float16",
                                compressors=_codec(codec))
        t = time.perf_counter()
        for b in blocks:
            arr.append(b[None])  # as RunStore.append does
        w = time.perf_counter() - t

        def read_zarr():
            a = zarr.open_array(d, mode="r")
            for k in range(checkpoints):
                a[k]
        cold, warm = timed_reads(read_zarr, d)
        rows.append({"format": f"zarr {codec}", "chunk_rows": chunk_rows, "write_mb_s": mb / w,
                     "read_cold_mb_s": mb / cold, "read_warm_mb_s": mb / warm, "disk_mb": _du(d) / 1e6})
        shutil.rmtree(d)
        if progress:
            print(f"  {rows[-1]['format']:<16} rows {chunk_rows:>5}: write {mb / w:7.0f} MB/s, read cold "
                  f"{mb / cold:7.0f} MB/s, warm {mb / warm:7.0f} MB/s", flush=True)
    for r in rows:
        for k in ("write_mb_s", "read_cold_mb_s", "read_warm_mb_s", "disk_mb"):
            r[k] = round(r[k], 1)
        r["data_mb"] = round(mb, 1)
    return rows


# ---------------------------------------------------------------------------------------------- report
def markdown(res: Dict[str, Any]) -> str:
    b = res["build"]
    lines = ["## Scale (`python -m benchmarks.scale`)", "",
             f"Synthetic run store written through `RunStore.append`: {b['n_train']:,} training images, "
             f"{b['checkpoints']} checkpoints, one module of {b['dim']} {b['dtype']} features (1 condition, 1 timestep), "
             f"{b['probes']} probes, {b['concepts']} concepts: {b['train_features_raw_mb']:,.0f} MB of training "
             f"features, {b['store_mb_on_disk']:,.0f} MB on disk; appended at {b['append_mb_per_s']:,.0f} MB/s "
             f"({b['append_s']} s).", "",
             "Attribution of the 64 probes (query mode A), each in a fresh subprocess "
             "(`montrage attribute RUN --method M --query-mode A`), peak RSS of that process:", "",
             "| method | scoring | wall (s) | peak RSS (MB) | psutil-sampled peak (MB) | < 2 GB |", "|---|---|---|---|---|---|"]
    for m in res["memory"]:
        ok = m.get("rc") == 0 and m.get("peak_rss_mb", 1e9) < RSS_TARGET_MB
        lines.append(f"| {m['method']} | {m['scheduler']} | {m.get('wall_s', '-')} | {m.get('peak_rss_mb', '-')} | "
                     f"{m['sampled_peak_rss_mb']} | {'yes' if ok else '**no**'} |")
    if res.get("throughput"):
        t0 = res["throughput"][0]
        lines += ["", f"Throughput, {t0['data_mb']:,.0f} MB of float16 features (4 checkpoints x {b['n_train']:,} x "
                  f"{b['dim']}), this machine ({os.cpu_count()} cores, shared); write = to the page cache "
                  "(no fsync), one run; reads best of 2, cold = after fsync + posix_fadvise(DONTNEED) of the files:", "",
                  "| format | chunk rows | write MB/s | read MB/s (cold) | read MB/s (warm) | on disk (MB) |",
                  "|---|---|---|---|---|---|"]
        for r in res["throughput"]:
            lines.append(f"| {r['format']} | {r['chunk_rows']} | {r['write_mb_s']:,.0f} | {r['read_cold_mb_s']:,.0f} | "
                         f"{r['read_warm_mb_s']:,.0f} | {r['disk_mb']:,.0f} |")
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    store_run = out / "run"
    res: Dict[str, Any] = {}
    previous = json.loads((out / "scale.json").read_text()) if (out / "scale.json").exists() else {}
    if args.reuse and (store_run / "store.zarr" / "zarr.json").exists() and "build" in previous:
        res["build"] = previous["build"]
        print(f"reusing {store_run}")
    else:
        print(f"building {args.n_train:,}-image store in {store_run} ...", flush=True)
        res["build"] = build_store(store_run, args.n_train, args.checkpoints, args.dim, args.probes,
                                   concepts=args.concepts, dtype=args.dtype)
        print(json.dumps(res["build"]), flush=True)
    res["memory"] = []
    for method in args.methods.split(","):
        for sched in [None] + ([args.dask] if args.dask else []):
            m = measure_scoring(store_run, method, sched)
            res["memory"].append(m)
            print(json.dumps(m), flush=True)
    if not args.skip_throughput:
        res["throughput"] = throughput(out / "throughput", n_rows=args.n_train, dim=args.dim)
    elif previous.get("throughput"):
        res["throughput"] = previous["throughput"]
    (out / "scale.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    print(md)
    if args.write_md:
        from benchmarks.cli import write_md_section

        print(f"wrote section '{MD_TAG}' of {write_md_section(MD_TAG, md, args.write_md)}")
    if not args.keep:
        shutil.rmtree(store_run, ignore_errors=True)
    return 0 if all(m.get("rc") == 0 and m.get("peak_rss_mb", 1e9) < RSS_TARGET_MB for m in res["memory"]) else 1


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["score"]:  # the measured child
        ap = argparse.ArgumentParser(prog="python -m benchmarks.scale score")
        ap.add_argument("run")
        ap.add_argument("--method", required=True)
        ap.add_argument("--scheduler", default=None)
        ap.add_argument("--json-out", required=True)
        a = ap.parse_args(argv[1:])
        print(json.dumps(score_child(a.run, a.method, a.scheduler, a.json_out)))
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n")[0])
    ap.add_argument("--n-train", type=int, default=200_000)
    ap.add_argument("--checkpoints", type=int, default=20)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    ap.add_argument("--probes", type=int, default=64)
    ap.add_argument("--concepts", type=int, default=100)
    ap.add_argument("--methods", default="final-sim,montrage-unsupervised")
    ap.add_argument("--dask", default=None, metavar="SCHEDULER",
                    help="also measure each method with --scheduler SCHEDULER (e.g. threads, local)")
    ap.add_argument("--out", default="bench-out/scale")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="reuse the store of an earlier run in --out")
    ap.add_argument("--keep", action="store_true", help="keep the store (several GB) afterwards")
    from benchmarks.cli import add_write_md_option

    add_write_md_option(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

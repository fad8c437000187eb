"""Fault-injection benchmark: SIGKILL ``montrage train`` at random times and inside checkpoint writes.

``montrage bench faults [--quick] [--out DIR] [--write-md]`` (or ``python -m benchmarks.faults``).

Each trial launches ``python -m montrage.cli train`` on a tiny synthetic dataset as a subprocess into a
fresh output folder and SIGKILLs it at a trigger chosen with a seeded RNG:

- ``in-write``: as soon as the chunk file of checkpoint k of one appended array (train features, anchor
  loss, probe images, LoRA weights, ...) appears on disk, i.e. inside that checkpoint's store write,
  after some of its arrays were appended and before the commit marker ``committed_checkpoints``;
- ``after-commit``: as soon as the root ``zarr.json`` shows checkpoint k committed (between the store
  commit and the resume file that follows it);
- ``creation``: as soon as ``store.zarr/zarr.json`` appears (inside the store's creation);
- ``random``: after a uniform random delay over the uninterrupted run's duration.

Whether a kill landed inside a write is measured, not assumed: after the kill, an appended array longer
than the commit marker (or a half-created store) means the writer died mid-write.

Then the trial checks that the store opens read-only, that every checkpoint committed before the kill is
identical to the uninterrupted reference run's (steps, features, losses, probe images, LoRA weights) and
that nothing past the marker is visible; reruns the same command to completion; and checks that the
steps equal the reference's (nothing lost, nothing duplicated) and that every array and the final LoRA
file equal the reference's. ``train_loss`` (a running mean) is compared too and reported separately.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
MD_TAG = "faults"
MODES_CYCLE = ("in-write", "after-commit", "random", "in-write", "random", "creation", "in-write", "random",
               "after-commit", "in-write")


@dataclass
class FaultSettings:
    """A tiny but complete `montrage train` run (probes, anchors, LoRA recorded)."""

    steps: int = 12
    every: int = 2
    batch_size: int = 2
    n_artists: int = 2
    images_per_artist: int = 4
    modules: str = "mid_block"
    pooling_grid: int = 1
    n_probes: int = 2
    seed: int = 0
    timeout_s: float = 300.0

    @property
    def checkpoint_steps(self) -> List[int]:
        steps = list(range(0, self.steps + 1, self.every))
        return steps if steps[-1] == self.steps else steps + [self.steps]


TEST_SETTINGS = FaultSettings(steps=4, every=2)


# ---------------------------------------------------------------------------------------------- set-up
def child_env() -> Dict[str, str]:
    """Environment of every training subprocess: one thread (bitwise-reproducible runs), repo on the path."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def prepare(workdir: Path, settings: FaultSettings) -> tuple[Path, Path]:
    """The dataset folder and a probe file (few probes keep every checkpoint short)."""
    from montrage.data.synthetic import write_concept_dataset

    workdir.mkdir(parents=True, exist_ok=True)
    data = workdir / "data"
    if not (data / "metadata.jsonl").exists():
        write_concept_dataset(data, n_artists=settings.n_artists, images_per_artist=settings.images_per_artist)
    probes = workdir / "probes.jsonl"
    lines = [json.dumps({"prompt": f"a circle by artist-{i % settings.n_artists}", "seed": 10_000 + i,
                         "concept": f"artist-{i % settings.n_artists}"}) for i in range(settings.n_probes)]
    probes.write_text("\n".join(lines) + "\n")
    return data, probes


def train_command(data: Path, output: Path, probes: Path, settings: FaultSettings, steps: Optional[int] = None) -> List[str]:
    return [sys.executable, "-m", "montrage.cli", "--quiet", "train", "--data", str(data), "--output", str(output),
            "--steps", str(steps or settings.steps), "--checkpoint-every", str(settings.every),
            "--batch-size", str(settings.batch_size), "--probes", str(probes), "--modules", settings.modules,
            "--pooling-grid", str(settings.pooling_grid), "--seed", str(settings.seed),
            "--capture", "inline"]  # kills land in the training process's own checkpoint writes (the background
    #                                  worker's and `montrage capture`'s kills: tests/callbacks/test_capture_modes.py)


def launch(cmd: List[str], log_path: Path) -> subprocess.Popen:
    log = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=str(REPO_ROOT))
    finally:
        log.close()


def run_to_end(cmd: List[str], log_path: Path, timeout: float) -> int:
    proc = launch(cmd, log_path)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return -9


# ---------------------------------------------------------------------------------------------- reading
def _store_dir(run: Path) -> Path:
    from montrage.storage import RunStore

    return RunStore.store_path(run)


def _appendable_paths(modules: List[str]) -> List[str]:
    from montrage.storage import schema as S

    out = [f"{S.CHECKPOINTS}/{n}" for n in (S.STEP, S.WALL_TIME, S.TRAIN_LOSS)]
    for kind in S.FEATURE_KINDS:
        out += [S.feature_path(kind, m) for m in modules] + [f"{kind}/{S.LOSS}"]
    return out + [f"{S.PROBES}/{S.IMAGES}", f"{S.LORA}/{S.WEIGHTS}"]


def _json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def committed_on_disk(run: Path) -> int:
    from montrage.storage import schema as S

    meta = _json(_store_dir(run) / "zarr.json") or {}
    return int((meta.get("attributes") or {}).get(S.ATTR_COMMITTED, 0))


def disk_state(run: Path, modules: List[str]) -> Dict[str, Any]:
    """What a killed writer left on disk, read from the raw Zarr metadata (no montrage reader involved)."""
    root = _store_dir(run)
    meta = _json(root / "zarr.json")
    if meta is None:
        return {"store": "absent", "committed": 0, "partial_arrays": [], "in_write": False}
    if not meta.get("attributes"):
        return {"store": "half-created", "committed": 0, "partial_arrays": [], "in_write": True}
    n = committed_on_disk(run)
    partial = []
    for p in _appendable_paths(modules):
        am = _json(root / p / "zarr.json")
        if am is not None and int(am["shape"][0]) > n:
            partial.append(p)
    return {"store": "initialised", "committed": n, "partial_arrays": partial, "in_write": bool(partial)}


def snapshot(run: Path) -> Dict[str, np.ndarray]:
    """Every committed array of a run (through the read-only reader), by name."""
    from montrage.storage import RunStore
    from montrage.storage import schema as S

    st = RunStore.open(run)
    n = st.n_checkpoints
    out: Dict[str, np.ndarray] = {"steps": st.steps, "train_loss": st.scalar_series(S.TRAIN_LOSS)}
    for kind in S.FEATURE_KINDS:
        for m in st.modules:
            out[S.feature_path(kind, m)] = st.features(kind, m)
        out[f"{kind}/{S.LOSS}"] = st.losses(kind)
    out["probes/images"] = st.array(f"{S.PROBES}/{S.IMAGES}")[:n]
    out["lora/weights"] = st.array(f"{S.LORA}/{S.WEIGHTS}")[:n]
    return out


def final_lora(run: Path) -> Optional[Dict[str, np.ndarray]]:
    from safetensors.numpy import load_file

    from montrage.storage import schema as S

    path = run / S.FINAL_LORA_FILENAME
    try:
        return load_file(str(path))
    except Exception:  # absent or truncated by the kill
        return None


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))


def compare_checkpoints(got: Dict[str, np.ndarray], ref: Dict[str, np.ndarray], upto: int) -> Dict[str, Any]:
    """Checkpoints 0..upto-1 of ``got`` against the reference: which are intact, and which arrays differ."""
    intact, diffs = [], {}
    for i in range(upto):
        ok = True
        for name, r in ref.items():
            if name in ("train_loss",):
                continue
            g = got.get(name)
            if g is None or g.shape[0] <= i or i >= r.shape[0] or not _equal(g[i], r[i]):
                ok = False
                if g is not None and g.shape[0] > i and i < r.shape[0] and g[i].shape == r[i].shape:
                    diffs[f"{name}[{i}]"] = float(np.nanmax(np.abs(g[i].astype(np.float64) - r[i].astype(np.float64))))
                else:
                    diffs[f"{name}[{i}]"] = "missing"
        intact.append(ok)
    return {"intact": intact, "diffs": diffs}


# ---------------------------------------------------------------------------------------------- killing
def _chunk_key(path: str, k: int) -> str:
    ndim = 1 if path.startswith("checkpoints/") else (2 if path.startswith("lora/") else
                                                       (4 if path.endswith("/loss") else 5))
    return "c/" + "/".join([str(k)] + ["0"] * (ndim - 1))


def kill_targets(modules: List[str]) -> List[str]:
    """Arrays whose new chunk marks 'inside the write of checkpoint k' (in the order append writes them)."""
    return [p for p in _appendable_paths(modules) if not p.startswith("checkpoints/")]


def kill_when(proc: subprocess.Popen, trigger: Callable[[], bool], deadline_s: float, extra_delay_s: float = 0.0,
              poll_s: float = 0.0002) -> Dict[str, Any]:
    """Poll ``trigger`` until it holds (then SIGKILL) or the process ends by itself."""
    t0 = time.monotonic()
    fired = False
    while time.monotonic() - t0 < deadline_s and proc.poll() is None:
        if trigger():
            fired = True
            break
        time.sleep(poll_s)
    if fired and extra_delay_s:
        time.sleep(extra_delay_s)
    exited_before = proc.poll() is not None
    if not exited_before:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return {"fired": fired, "kill_at_s": round(time.monotonic() - t0, 4), "exited_before_kill": exited_before,
            "returncode": proc.returncode}


def plan_trial(i: int, rng: np.random.Generator, settings: FaultSettings, ref_duration_s: float,
               modules: List[str]) -> Dict[str, Any]:
    mode = MODES_CYCLE[i % len(MODES_CYCLE)]
    K = len(settings.checkpoint_steps)
    plan: Dict[str, Any] = {"mode": mode}
    if mode == "in-write":
        targets = kill_targets(modules)
        # favour the early arrays of a write (wider window before the commit marker), reach every one
        w = np.linspace(2.0, 1.0, len(targets))
        plan.update(k=int(rng.integers(0, K)), array=str(rng.choice(targets, p=w / w.sum())),
                    extra_delay_s=float(rng.choice([0.0, 0.0, 0.001, 0.003])))
    elif mode == "after-commit":
        plan.update(k=int(rng.integers(0, K - 1)))
    elif mode == "random":
        plan.update(delay_s=float(rng.uniform(0.3, ref_duration_s)))
    return plan


def run_trial(workdir: Path, name: str, plan: Dict[str, Any], data: Path, probes: Path, settings: FaultSettings,
              ref: Dict[str, np.ndarray], ref_lora: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """Kill one training run as ``plan`` says, check the store, rerun to completion, check again."""
    import shutil

    from montrage.errors import StoreError
    from montrage.storage import RunStore

    run = workdir / name
    shutil.rmtree(run, ignore_errors=True)
    log_path = workdir / f"{name}.log"
    log_path.unlink(missing_ok=True)
    cmd = train_command(data, run, probes, settings)
    modules = settings.modules.split(",")
    sdir = _store_dir(run)
    mode = plan["mode"]
    if mode == "in-write":
        chunk = sdir / plan["array"] / _chunk_key(plan["array"], plan["k"])
        trigger = chunk.exists
    elif mode == "after-commit":
        trigger = lambda: committed_on_disk(run) >= plan["k"] + 1  # noqa: E731
    elif mode == "creation":
        trigger = (sdir / "zarr.json").exists
    else:
        t_kill = time.monotonic() + plan["delay_s"]
        trigger = lambda: time.monotonic() >= t_kill  # noqa: E731
    proc = launch(cmd, log_path)
    kill = kill_when(proc, trigger, settings.timeout_s, plan.get("extra_delay_s", 0.0))
    state = disk_state(run, modules)
    result: Dict[str, Any] = {"trial": name, **plan, **kill, "committed_at_kill": state["committed"],
                              "store_at_kill": state["store"], "partial_arrays": state["partial_arrays"],
                              "landed_in_write": state["in_write"] and not kill["exited_before_kill"]}
    # 1) the store opens; committed checkpoints intact; the partial one invisible
    n = state["committed"]
    if state["store"] == "initialised":
        try:
            reader = RunStore.open(run)
            result["store_opens"] = True
            visible = reader.n_checkpoints
            got = snapshot(run)
            result["partial_invisible"] = visible == n and all(v.shape[0] == n for v in got.values())
            cmp = compare_checkpoints(got, ref, n)
            result["committed_intact"] = all(cmp["intact"]) and _equal(got["steps"], ref["steps"][:n])
            result["diffs_after_kill"] = cmp["diffs"]
        except StoreError as exc:
            result.update(store_opens=False, open_error=str(exc), partial_invisible=False, committed_intact=False)
    else:  # killed before the store held anything: the reader must refuse cleanly, nothing was committed
        try:
            RunStore.open(run)
            result["store_opens"] = False  # a store that should not be readable was readable
        except StoreError as exc:
            result["store_opens"] = True
            result["open_error"] = str(exc)
        result.update(partial_invisible=True, committed_intact=True)
    # 2) rerun the same command to completion
    t0 = time.monotonic()
    rc = run_to_end(cmd, log_path, settings.timeout_s)
    result.update(rerun_rc=rc, rerun_s=round(time.monotonic() - t0, 2))
    lost = n
    if rc == 0:
        got = snapshot(run)
        cmp = compare_checkpoints(got, ref, len(ref["steps"]))
        result["steps_after_rerun"] = got["steps"].tolist()
        result["steps_equal"] = _equal(got["steps"], ref["steps"])
        result["arrays_equal"] = all(cmp["intact"]) and got["steps"].shape == ref["steps"].shape
        result["diffs_after_rerun"] = cmp["diffs"]
        lora = final_lora(run)
        result["final_lora_equal"] = lora is not None and set(lora) == set(ref_lora) and all(
            _equal(lora[k], ref_lora[k]) for k in ref_lora)
        tl, rtl = got["train_loss"], ref["train_loss"]
        result["train_loss_equal"] = tl.shape == rtl.shape and bool(np.allclose(tl, rtl, rtol=1e-6, equal_nan=True))
        if not result["train_loss_equal"] and tl.shape == rtl.shape:
            result["train_loss_diff_steps"] = [int(s) for s, a, b in zip(ref["steps"], tl, rtl)
                                               if not np.isclose(a, b, rtol=1e-6, equal_nan=True)]
        lost = sum(1 for i in range(n) if not cmp["intact"][i])
    else:
        result.update(steps_equal=False, arrays_equal=False, final_lora_equal=False, train_loss_equal=False,
                      rerun_log_tail=log_path.read_text(errors="replace")[-1500:])
    if result.get("committed_intact") is False:
        lost = max(lost, n)
    result["data_lost_checkpoints"] = int(lost)
    result["survived"] = bool(result["store_opens"] and result["committed_intact"] and result["partial_invisible"]
                              and rc == 0 and result["steps_equal"] and result["arrays_equal"]
                              and result["final_lora_equal"])
    shutil.rmtree(run, ignore_errors=True)
    return result


def reference_run(workdir: Path, data: Path, probes: Path, settings: FaultSettings) -> Dict[str, Any]:
    run = workdir / "reference"
    import shutil

    shutil.rmtree(run, ignore_errors=True)
    t0 = time.monotonic()
    rc = run_to_end(train_command(data, run, probes, settings), workdir / "reference.log", settings.timeout_s)
    duration = time.monotonic() - t0
    if rc != 0:
        raise RuntimeError(f"reference run failed (rc {rc}); see {workdir / 'reference.log'}")
    ref = snapshot(run)
    assert ref["steps"].tolist() == settings.checkpoint_steps, ref["steps"]
    return {"run": run, "arrays": ref, "lora": final_lora(run), "duration_s": duration}


# ---------------------------------------------------------------------------------------------- campaign
def run_campaign(workdir: Path, n_trials: int, settings: FaultSettings, seed: int = 0,
                 progress: Callable[[str], None] = print) -> Dict[str, Any]:
    workdir = Path(workdir)
    data, probes = prepare(workdir, settings)
    t0 = time.monotonic()
    ref = reference_run(workdir, data, probes, settings)
    progress(f"reference run: steps {ref['arrays']['steps'].tolist()} in {ref['duration_s']:.1f} s")
    rng = np.random.default_rng(seed)
    modules = settings.modules.split(",")
    trials = []
    for i in range(n_trials):
        plan = plan_trial(i, rng, settings, ref["duration_s"], modules)
        res = run_trial(workdir, f"trial-{i:02d}", plan, data, probes, settings, ref["arrays"], ref["lora"])
        trials.append(res)
        progress(f"trial {i:2d} {plan['mode']:<12} kill@{res['kill_at_s']:6.2f}s committed {res['committed_at_kill']} "
                 f"in-write {res['landed_in_write']!s:<5} survived {res['survived']} lost {res['data_lost_checkpoints']} "
                 f"train_loss_equal {res['train_loss_equal']}")
    summary = summarize(trials)
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    return {"settings": asdict(settings), "seed": seed, "reference_steps": ref["arrays"]["steps"].tolist(),
            "reference_duration_s": round(ref["duration_s"], 2), "summary": summary, "trials": trials}


def summarize(trials: List[Dict[str, Any]]) -> Dict[str, Any]:
    by_mode: Dict[str, Dict[str, int]] = {}
    for t in trials:
        m = by_mode.setdefault(t["mode"], {"trials": 0, "survived": 0, "landed_in_write": 0, "data_lost": 0,
                                           "train_loss_mismatch": 0})
        m["trials"] += 1
        m["survived"] += int(t["survived"])
        m["landed_in_write"] += int(t["landed_in_write"])
        m["data_lost"] += t["data_lost_checkpoints"]
        m["train_loss_mismatch"] += int(not t["train_loss_equal"])
    total = {k: sum(m[k] for m in by_mode.values()) for k in ("trials", "survived", "landed_in_write", "data_lost",
                                                               "train_loss_mismatch")}
    total["committed_before_kill"] = sum(t["committed_at_kill"] for t in trials)
    return {"total": total, "by_mode": by_mode}


def markdown(result: Dict[str, Any]) -> str:
    s = result["settings"]
    tot = result["summary"]["total"]
    lines = ["## Fault injection (`montrage bench faults`)" + (" (--quick)" if result.get("quick") else ""), "",
             result.get("provenance", ""), "",
             f"`montrage train` (subprocess; {s['n_artists']}x{s['images_per_artist']} images, {s['steps']} steps, "
             f"checkpoint every {s['every']}: steps {result['reference_steps']}) SIGKILLed once per trial "
             f"(seed {result['seed']}), then reopened, checked against an uninterrupted reference run, rerun to "
             "completion and checked again. 'in write' = the kill left appended data past the commit marker "
             "(or a half-created store) on disk. 'data lost' = checkpoints committed before the kill that were "
             "missing or different afterwards.", "",
             "| kill trigger | trials | survived | kills inside a write | data lost (checkpoints) | train_loss differs |",
             "|---|---|---|---|---|---|"]
    for mode, m in sorted(result["summary"]["by_mode"].items()):
        lines.append(f"| {mode} | {m['trials']} | {m['survived']} | {m['landed_in_write']} | {m['data_lost']} | "
                     f"{m['train_loss_mismatch']} |")
    lines.append(f"| **all** | **{tot['trials']}** | **{tot['survived']}** | **{tot['landed_in_write']}** | "
                 f"**{tot['data_lost']}** | **{tot['train_loss_mismatch']}** |")
    lines += ["", f"{tot['committed_before_kill']} checkpoints were committed before the kills in total; "
              f"campaign wall time {result['summary']['wall_s']} s.", "",
              "| trial | trigger | kill at (s) | committed | in write | opens | intact | partial hidden | rerun steps == ref "
              "| arrays + LoRA == ref | train_loss == ref |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for t in result["trials"]:
        trig = t["mode"] + (f" k={t['k']}" if "k" in t else "") + (f" {t['array']}" if "array" in t else "")
        lines.append(f"| {t['trial']} | {trig} | {t['kill_at_s']:.2f} | {t['committed_at_kill']} | "
                     f"{'yes' if t['landed_in_write'] else 'no'} | {_yn(t['store_opens'])} | {_yn(t['committed_intact'])} | "
                     f"{_yn(t['partial_invisible'])} | {_yn(t['steps_equal'])} | "
                     f"{_yn(t['arrays_equal'] and t['final_lora_equal'])} | {_yn(t['train_loss_equal'])} |")
    return "\n".join(lines) + "\n"


def _yn(v: Any) -> str:
    return "yes" if v else "**no**"


def run_faults_bench(args: argparse.Namespace) -> int:
    """Entry of ``montrage bench faults``: args.quick, args.out, args.write_md (args.trials, args.seed optional)."""
    quick = bool(getattr(args, "quick", False))
    n = getattr(args, "trials", None) or (3 if quick else 20)
    seed = int(getattr(args, "seed", 0) or 0)
    out = Path(getattr(args, "out", "bench-out")) / "faults"
    settings = FaultSettings(steps=6) if quick else FaultSettings()
    result = run_campaign(out / "work", n, settings, seed=seed)
    result["quick"] = quick
    if getattr(args, "write_md", False):
        from benchmarks.cli import provenance_lines

        result["provenance"] = provenance_lines(argparse.Namespace(**{"kind": "faults", **vars(args)}),
                                                f"kill plan {seed} (numpy default_rng), training --seed {settings.seed}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "faults.json").write_text(json.dumps(result, indent=2, default=str))
    md = markdown(result)
    print(md)
    print(f"wrote {out / 'faults.json'}")
    if getattr(args, "write_md", False):
        from benchmarks.cli import write_md_section

        print(f"wrote section '{MD_TAG}' of {write_md_section(MD_TAG, md, args.write_md)}")
    tot = result["summary"]["total"]
    return 0 if tot["survived"] == tot["trials"] else 1


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.faults", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 trials of a 6-step run")
    ap.add_argument("--trials", type=int, default=None, help="number of trials (default 20; 3 with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench-out")
    from benchmarks.cli import add_write_md_option

    add_write_md_option(ap)
    return run_faults_bench(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

"""``python -m benchmarks KIND`` (what ``montrage bench KIND`` runs in a checkout): dispatch to the
benchmarks, and (re)write their BENCHMARKS.md sections.

Relative paths (``--out``, ``--run``, ``--write-md PATH``) are the caller's: ``montrage bench`` runs this in the
checkout root and passes its own working directory as ``MONTRAGE_CALLER_CWD``.

To add a benchmark: write ``run_<kind>(args) -> int`` here (or in its own module) and register it in
:data:`BENCHES`; with ``--write-md`` call :func:`write_md_section` with its ``<!-- bench:KIND -->`` body.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Callable, Dict, Optional

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS_MD = REPO_ROOT / "BENCHMARKS.md"  # the checkout's, never inside site-packages
MD_TITLE = "# montrage benchmarks\n\nEach section is (re)written by `montrage bench KIND --write-md`; do not edit between the markers.\n"


# ----------------------------------------------------------------------------- provenance
def git_commit(root: Path = REPO_ROOT) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> Dict[str, object]:
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "cuda": torch.cuda.is_available()}


def command_line(args: argparse.Namespace) -> str:
    parts = ["montrage", "bench", args.kind]
    if getattr(args, "quick", False):
        parts.append("--quick")
    if getattr(args, "out", None):
        parts += ["--out", str(args.out)]
    if getattr(args, "seed", None) is not None and args.kind not in ("list", "faults"):
        parts += ["--seed", str(args.seed)]
    if getattr(args, "dataset", None) and args.kind in ("attribution", "quality", "concept") and (
            args.kind != "concept" or args.dataset != "synthetic"):
        parts += ["--dataset", str(args.dataset)]
    if getattr(args, "retrains", 0) and args.kind == "attribution":
        parts += ["--retrains", str(args.retrains)]
    for flag in ("train_steps", "rank", "lr", "lds_subsets"):
        if getattr(args, flag, None) is not None and args.kind == "attribution":
            parts += ["--" + flag.replace("_", "-"), f"{getattr(args, flag):g}"]
    if getattr(args, "per_concept", None) and args.kind == "concept":
        parts += ["--per-concept", str(args.per_concept)]
    if getattr(args, "run", None):
        parts += ["--run", str(args.run)]
    if getattr(args, "write_md", None):
        parts.append("--write-md")
    threads = os.environ.get("OMP_NUM_THREADS")
    return (f"OMP_NUM_THREADS={threads} " if threads else "") + " ".join(parts)


def provenance_lines(args: argparse.Namespace, seeds: str) -> str:
    m = machine_info()
    return "\n".join([
        f"- command: `{command_line(args)}`",
        f"- git commit: `{git_commit()}`; date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- seeds: {seeds}",
        f"- machine: {m['cpu_count']} CPUs, {m['platform']}, Python {m['python']}, torch {m['torch']} "
        f"({m['torch_threads']} intra-op threads, OMP_NUM_THREADS={m['OMP_NUM_THREADS']}, CUDA {m['cuda']})",
    ])


def write_md_section(kind: str, body: str, path: Optional[Path] = None) -> Path:
    """Replace (or append) the text between ``<!-- bench:KIND -->`` and ``<!-- /bench:KIND -->`` of ``path``
    (default: the checkout's BENCHMARKS.md)."""
    path = Path(path) if path is not None else BENCHMARKS_MD
    start, end = f"<!-- bench:{kind} -->", f"<!-- /bench:{kind} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.is_file() else MD_TITLE
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text, count=1)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- benchmarks
def run_attribution(args: argparse.Namespace) -> int:
    from benchmarks.attribution import run_from_cli

    return run_from_cli(args)


def run_quality(args: argparse.Namespace) -> int:
    from benchmarks.quality import run_quality_bench

    dataset = getattr(args, "dataset", None) or "synthetic"
    name = "quality" if dataset == "synthetic" else f"quality-{dataset}"
    res = run_quality_bench(Path(args.out) / (name + ("-quick" if args.quick else "")), quick=args.quick,
                            dataset=dataset, seed=getattr(args, "seed", None))
    print()
    print(res["markdown"])
    if args.write_md:
        title = "## Embedded model quality gate" + ("" if dataset == "synthetic" else f" ({dataset})")
        body = "\n".join([title + (" (--quick)" if args.quick else ""), "",
                          provenance_lines(args, res["seeds"]), "", res["markdown"]])
        print(f"wrote section '{name}' of {write_md_section(name, body, args.write_md)}")
    return 0 if res.get("passed", False) or args.quick else 1


def run_list(args: argparse.Namespace) -> int:
    from montrage.analysis.base import available, get_scorer

    for name in available():
        print(f"{name:<24} {getattr(get_scorer(name), 'description', '')}")
    return 0


def run_cost_bench(args: argparse.Namespace) -> int:
    from benchmarks.cost import run_cost

    return run_cost(args)


def run_overhead_bench(args: argparse.Namespace) -> int:
    from benchmarks.overhead import run_overhead

    return run_overhead(args)


def run_overhead_realsize_bench(args: argparse.Namespace) -> int:
    from benchmarks.overhead_realsize import run_overhead_realsize

    return run_overhead_realsize(args)  # --quick: the --small base and a few steps


def run_concept_bench(args: argparse.Namespace) -> int:
    from benchmarks.concept import run_concept

    return run_concept(args)


def run_faults(args: argparse.Namespace) -> int:
    from benchmarks.faults import run_faults_bench

    return run_faults_bench(args)


BENCHES: Dict[str, Callable[[argparse.Namespace], int]] = {
    "attribution": run_attribution,
    "quality": run_quality,
    "list": run_list,
    "cost": run_cost_bench,
    "concept": run_concept_bench,
    "overhead": run_overhead_bench,
    "overhead-realsize": run_overhead_realsize_bench,
    "faults": run_faults,
}


def caller_path(p: Optional[str]) -> Optional[Path]:
    """A path argument as the caller meant it (``montrage bench`` runs us from the checkout root)."""
    if p is None:
        return None
    q = Path(p).expanduser()
    return q if q.is_absolute() else Path(os.environ.get("MONTRAGE_CALLER_CWD") or Path.cwd()) / q


def add_write_md_option(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--write-md", nargs="?", const=str(BENCHMARKS_MD), default=None, metavar="PATH",
                    help="(re)write this benchmark's section of PATH (default: BENCHMARKS.md in the checkout root)")


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description="montrage benchmarks (run from a checkout; "
                                 "`montrage bench KIND ...` runs this)")
    ap.add_argument("kind", choices=sorted(BENCHES), help="which benchmark")
    ap.add_argument("--run", default=None, help="concept: the run to use (default: the attribution run of --dataset "
                    "and --seed under OUT); cost: measure only the stored gradient features on this run")
    ap.add_argument("--per-concept", type=int, default=None, metavar="N",
                    help="concept: build (and cache under OUT) a run like the attribution benchmark's with N images "
                    "per artist instead of using the attribution run (8 per artist cap artist P@10 at 0.80)")
    ap.add_argument("--quick", action="store_true", help="smaller settings that fit a test budget")
    ap.add_argument("--repeats", type=int, default=None, help="overhead: alternated runs per mode (default 2; 1 with --quick)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data, training, queries and bootstrap (default 0)")
    ap.add_argument("--dataset", default="synthetic", choices=["synthetic", "typefaces"],
                    help="attribution/concept: the training set (default synthetic)")
    ap.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    ap.add_argument("--prepare", action="store_true", help="attribution: only build the cached run, queries and "
                    "LDS retrains of this (dataset, seed); a later run without --prepare re-scores from them")
    ap.add_argument("--rescore", default=None, metavar="M1,M2",
                    help="attribution: recompute only these methods' scores, reuse the saved scores of the others "
                    "(computed on the same queries)")
    ap.add_argument("--retrains", type=int, default=0, metavar="N",
                    help="attribution: `montrage fit --retrains N` on the run before scoring (counterfactual targets "
                    "for the fused model; cached beside the run)")
    ap.add_argument("--train-steps", type=_positive(int), default=None, metavar="N",
                    help="attribution: a variant whose LoRA trains N steps (5 checkpoints, every N/4); its run and "
                    "section are kept apart from the default benchmark's and left out of the summary")
    ap.add_argument("--rank", type=_positive(int), default=None, metavar="R", help="attribution: variant LoRA rank")
    ap.add_argument("--lr", type=_positive(float), default=None, metavar="LR",
                    help="attribution: variant learning rate")
    ap.add_argument("--lds-subsets", type=_positive(int), default=None, metavar="M",
                    help="attribution: variant number of retrained LDS subsets (default 20; each costs half a training)")
    ap.add_argument("--from-results", action="store_true",
                    help="attribution: report the saved results.json of this (dataset, seed) again (with --write-md)")
    add_write_md_option(ap)
    return ap


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    args.out = str(caller_path(args.out))
    args.run = None if args.run is None else str(caller_path(args.run))
    args.write_md = caller_path(args.write_md)
    return run_bench(args)


def run_bench(args: argparse.Namespace) -> int:
    fn: Optional[Callable[[argparse.Namespace], int]] = BENCHES.get(args.kind)
    if fn is None:
        print(f"unknown benchmark {args.kind!r}; known: {sorted(BENCHES)}")
        return 2
    return int(fn(args) or 0)

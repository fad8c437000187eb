"""The ``montrage`` command line: train, demo, inspect, attribute, compare, report, fit, bench."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import List, Optional

from montrage.errors import MontrageError

log = logging.getLogger("montrage")


def _add_train_options(p: argparse.ArgumentParser) -> None:
    from montrage import config as D
    from montrage.config import CaptureConfig, TrainConfig

    t, c = TrainConfig(), CaptureConfig()
    p.add_argument("--base", default="embedded", help="'embedded' (default) or a local diffusers pipeline folder")
    p.add_argument("--resolution", type=int, default=None, help="training resolution (default: the base model's)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimizer steps (default: from the data, {D.DEFAULT_EPOCHS:.0f} passes over the images, x "
                   f"sqrt(resolution / the base's) when above it, in [{D.DEFAULT_MIN_STEPS}, {D.DEFAULT_MAX_STEPS}]; "
                   "see README 'Training defaults')")
    p.add_argument("--batch-size", type=int, default=t.batch_size, help=f"images per step (default {t.batch_size})")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default {D.DEFAULT_LR} on the "
                   f"embedded model, {D.DEFAULT_LR_DIFFUSERS} on a diffusers base)")
    p.add_argument("--rank", type=int, default=None,
                   help=f"LoRA rank (default: 8 for up to {D.DEFAULT_SMALL_SET} images, 16 above)")
    p.add_argument("--checkpoint-every", type=int, default=c.every_n_steps,
                   help=f"record a montrage checkpoint every N steps, plus step 0 and the end (default {c.every_n_steps})")
    p.add_argument("--probes", default=None, help="probe file (jsonl with prompt, seed); default: derived from concepts")
    p.add_argument("--prior-data", default=None, help="imagefolder of prior-preservation images (base captions)")
    p.add_argument("--seed", type=int, default=t.seed, help=f"seed (default {t.seed})")
    p.add_argument("--modules", default=",".join(c.modules), help=f"UNet modules to capture (default {','.join(c.modules)})")
    p.add_argument("--pooling-grid", type=int, default=c.pooling_grid, help=f"spatial pooling grid side (default {c.pooling_grid})")
    p.add_argument("--no-monitor", action="store_true", help="the same fine-tuning without the callback (overhead comparisons)")
    p.add_argument("--capture", default="background", choices=["inline", "background", "deferred"],
                   help="where checkpoints are featurized: background (default: a worker process, the loop only "
                   "snapshots), inline (in the loop), deferred (snapshots only; `montrage capture` or "
                   "`montrage attribute` featurizes later). All give the same store")
    p.add_argument("--capture-threads", type=int, default=1,
                   help="CPU threads of the background capture worker (default 1)")
    p.add_argument("--capture-device", default="cpu",
                   help="device of the background capture worker (default cpu; e.g. cuda:1 for a second GPU)")
    p.add_argument("--no-store-images", action="store_true",
                   help="keep only the training images' paths and sha256 hashes in the run, not their pixels "
                   "(large sets; the images must then stay unchanged where they are)")


def _configs(args: argparse.Namespace):
    from montrage.config import CaptureConfig, LoraSettings, TrainConfig

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                      resolution=args.resolution, lora=None if args.rank is None else LoraSettings(rank=args.rank),
                      prior_fraction=TrainConfig().prior_fraction if args.prior_data else 0.0)
    capture = CaptureConfig(every_n_steps=args.checkpoint_every, modules=tuple(args.modules.split(",")),
                            pooling_grid=args.pooling_grid)
    return cfg, capture


def cmd_train(args: argparse.Namespace) -> int:
    from montrage.training import train

    cfg, capture = _configs(args)
    res = train(args.data, args.output, base=args.base, cfg=cfg, capture=capture, probes_file=args.probes,
                prior_dir=args.prior_data, monitor=not args.no_monitor, progress=not args.quiet,
                store_images=not args.no_store_images, capture_mode=args.capture,
                capture_threads=args.capture_threads, capture_device=args.capture_device)
    saved = f" (LoRA saved after {res.lora_saved_s:.1f} s)" if res.lora_saved_s is not None else ""
    print(f"trained steps {res.start_step}->{res.steps} in {res.wall_time_s:.1f} s{saved}; LoRA: {res.final_lora}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from montrage.storage.inspect import summary

    text, data = summary(args.run)
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


def _featurize_pending(args: argparse.Namespace) -> None:
    """Checkpoints snapshotted but not featurized yet (background or deferred capture): featurize them, or wait
    for the worker doing it, saying so, before reading the run. Called before the analysis modules are imported
    (torch, diffusers: seconds), so a missing or unreadable run is reported at once."""
    from montrage.capture import ensure_featurized
    from montrage.storage import RunStore

    RunStore.open(args.run).close()  # the error attribute/compare/report would raise, without their imports
    ensure_featurized(args.run, progress=not args.quiet)


def cmd_capture(args: argparse.Namespace) -> int:
    from montrage.capture import capture_run

    res = capture_run(args.run, num_processes=args.num_processes, threads=args.threads, device=args.device,
                      dask_scheduler=args.dask_scheduler, progress=not args.quiet)
    if not res.pending_before:
        print(f"{args.run}: nothing to featurize (no pending checkpoint)")
    else:
        print(f"featurized {len(res.featurized)} checkpoint(s) (steps {res.featurized}) in {res.seconds:.1f} s on "
              f"{args.dask_scheduler or f'{res.processes} process(es)'}")
    return 0


def cmd_attribute(args: argparse.Namespace) -> int:
    _featurize_pending(args)
    from montrage.analysis.attribute import attribute, between_concept_accuracy, write_json

    options = {"query_mode": args.query_mode}
    if args.concept:
        options["concept"] = args.concept
    if args.prompt:
        options["prompt"] = args.prompt
    if args.base:
        options["base"] = args.base
    res = attribute(args.run, args.method, args.checkpoint, args.top_k, args.images, condition=args.condition,
                    options=options, progress=not args.quiet, scheduler=args.scheduler)
    out = Path(args.out) if args.out else Path(args.run) / f"attribution_{args.method}_{res.step}.json"
    write_json(res.payload, out)
    acc = between_concept_accuracy(res.payload)
    for q in res.payload["queries"][: args.show]:
        top = q["top"][0] if q["top"] else {}
        print(f"{q['id']:>10}  {q['prompt'][:40]:<40} -> {q['predicted_concept']}  top: {top.get('file_name')} "
              f"({top.get('score', float('nan')):.3f})")
    if acc is not None:
        print(f"between-concept top-1 accuracy ({args.method}, step {res.step}): {acc:.3f}")
    print(f"wrote {out}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    _featurize_pending(args)
    from montrage.analysis.attribute import write_json
    from montrage.analysis.compare import compare

    plot = Path(args.plot) if args.plot else Path(args.run) / f"compare_{args.method}.png"
    res = compare(args.run, args.method, args.from_step, args.to_step, plot=plot, progress=not args.quiet,
                  options={"base": args.base} if args.base else None)
    out = Path(args.out) if args.out else Path(args.run) / f"compare_{args.method}.json"
    write_json(res, out)
    for c, s in res["learned_at"].items():
        acc = res["curves"][c]["accuracy"]
        print(f"{c:>12}: learned at step {s}; own-concept top-1 share per checkpoint {[round(a, 2) for a in acc if a is not None]}")
    for r in res["most_changed"][:3]:
        print(f"moved most: {r['prompt']!r} share change {r['share_change']:.2f} ({r['top_from']} -> {r['top_to']})")
    print(f"wrote {out} and {plot}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    _featurize_pending(args)
    from montrage.report import build_report

    path = build_report(args.run, method=args.method, out=args.out, progress=not args.quiet, base=args.base)
    print(f"report: {path}")
    return 0


def cmd_featurize(args: argparse.Namespace) -> int:
    from montrage.storage import RunStore

    RunStore.open(args.run).close()  # a missing run: one error before the gradient code is imported (seconds)
    from montrage.analysis.gradient_features import featurize

    steps = [int(x) for x in args.checkpoints.split(",")] if args.checkpoints else None
    ks = None if steps is None else [RunStore.open(args.run).checkpoint_index(st) for st in steps]
    options = {"proj_dim": args.proj_dim, "grad_batch_size": args.batch_size}
    res = featurize(args.run, [o.strip() for o in args.outputs.split(",") if o.strip()], ks, options,
                    device=args.device, overwrite=args.overwrite, progress=not args.quiet)
    for output, r in res.items():
        print(f"{output}: checkpoints {r['checkpoints']}, {r['bytes'] / 2 ** 20:.1f} MiB stored")
    seconds = next(iter(res.values()))["seconds"] if res else 0.0
    print(f"{seconds:.1f} s" + (" (the outputs share one forward pass per training item)" if len(res) > 1 else ""))
    return 0


def counterfactual_line(cf: dict) -> str:
    """What ``montrage fit`` says of the counterfactual term; when the held-out gain is positive but under the
    adoption bar (2 standard errors), that more retrains can resolve it: on the synthetic benchmark at seed 2 a gain
    of +.047 (s.e. .047) at 8 retrains became +.064 (s.e. .020) at 16, adopted, and LDS rose .665 -> .737."""
    head = f"counterfactual term ({cf['retrains']} retrains): "
    if cf.get("heldout_lds_with") is None:
        return head + f"not adopted, held-out LDS not measured: {cf['heldout']}"
    line = (head + f"held-out LDS {cf['heldout_lds_with']:.3f} with it, {cf['heldout_lds_without']:.3f} without "
            f"({cf['heldout']}); " + ("adopted" if cf.get("adopted") else "not adopted"))
    gain = float(cf["heldout_lds_with"]) - float(cf["heldout_lds_without"])
    if not cf.get("adopted") and gain > 0:
        line += (f" -- the gain {gain:+.3f} is under the bar of 2 standard errors "
                 f"({float(cf.get('heldout_gain_se', float('nan'))):.3f} each); more retrains "
                 f"(--retrains {2 * int(cf['retrains'])}) can resolve it")
    return line


def cmd_fit(args: argparse.Namespace) -> int:
    from montrage.storage import RunStore

    RunStore.open(args.run).close()  # a missing run: one error before training code is imported
    from montrage.analysis.fused import CHANNEL_SET_LABELS
    from montrage.retrains import fit_run, retrain

    if args.retrains:
        res = retrain(args.run, args.retrains, fraction=args.fraction, steps=args.steps, seed=args.seed,
                      prior_dir=args.prior, progress=not args.quiet)
        print(f"{len(res.loras)} retrained subsets ({res.reused} reused) -> {res.targets}")
    models = fit_run(args.run, [m.strip() for m in args.methods.split(",") if m.strip()])
    for name, kinds in models.items():
        for kind, m in kinds.items():
            top = sorted(zip(m["channels"], m["weights"]), key=lambda cw: -cw[1])[:5]
            print(f"{name} [{kind}]: " + ", ".join(f"{c} {w:.3f}" for c, w in top))
            cf = m.get("counterfactual") or {}
            if cf:
                print("  " + counterfactual_line(cf))
            cs = m.get("channel_set") or {}
            if cs.get("chosen"):
                print(f"  channels: {CHANNEL_SET_LABELS.get(cs['chosen'], cs['chosen'])} ({cs.get('why')})")
            ex = m.get("exact_caption") or {}
            if ex.get("supervision_r1"):
                before, after = ex["supervision_r1"]
                print(f"  exact caption first: R@1 on the generated supervision {before:.3f} without, {after:.3f} "
                      f"with; " + ("adopted" if ex.get("adopted") else "not adopted"))
            if ex.get("share_why"):
                print(f"  exact caption, the other images' share: {ex.get('others_share', 1.0):g} ({ex['share_why']})")
            if ex.get("memorised_why") and ex.get("memorised_why") != ex.get("share_why"):
                print(f"  memorisation test (sets the share when the run has no retrains): {ex['memorised_why']}")
    if args.json:
        Path(args.json).write_text(json.dumps(models, indent=1))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from montrage.demo import run_demo

    run_demo(args.out, steps=args.steps, quick=args.quick, progress=not args.quiet)
    return 0


BENCH_KINDS = ["attribution", "concept", "cost", "overhead", "faults", "quality", "list"]


def find_checkout(repo: Optional[str] = None) -> Optional[Path]:
    """The montrage source checkout holding ``benchmarks/``: ``repo`` if given, else the cwd or a parent.

    Benchmarks are not part of the installed library (they train runs and write BENCHMARKS.md), so the CLI
    only runs them from a checkout.
    """
    def is_checkout(d: Path) -> bool:
        return (d / "benchmarks" / "__main__.py").is_file() and (d / "montrage").is_dir()

    if repo is not None:
        d = Path(repo).expanduser().resolve()
        return d if is_checkout(d) else None
    cwd = Path.cwd().resolve()
    return next((d for d in [cwd, *cwd.parents] if is_checkout(d)), None)


def _split_repo_option(rest: List[str]) -> tuple[Optional[str], List[str]]:
    """``--repo PATH`` given after KIND lands in the pass-through arguments: take it out."""
    repo, out, i = None, [], 0
    while i < len(rest):
        if rest[i] == "--repo" and i + 1 < len(rest):
            repo, i = rest[i + 1], i + 2
            continue
        if rest[i].startswith("--repo="):
            repo = rest[i].split("=", 1)[1]
        else:
            out.append(rest[i])
        i += 1
    return repo, out


def cmd_bench(args: argparse.Namespace) -> int:
    import os
    import subprocess

    repo_after, rest = _split_repo_option(list(args.bench_args or []))
    repo = repo_after or args.repo
    if args.kind == "list" and "--help" not in rest and "-h" not in rest:  # the scorers: no checkout needed
        from montrage.analysis.base import available, get_scorer

        for name in available():
            print(f"{name:<24} {getattr(get_scorer(name), 'description', '')}")
        return 0
    root = find_checkout(repo)
    if root is None:
        from montrage.errors import ConfigError

        where = f"--repo {repo}" if repo else f"the current directory ({Path.cwd()}) or its parents"
        raise ConfigError(f"`montrage bench` runs the benchmarks of a montrage source checkout, and {where} "
                          "holds none (no benchmarks/__main__.py next to montrage/); run it from a montrage "
                          "checkout, or pass --repo PATH_TO_CHECKOUT")
    env = dict(os.environ, MONTRAGE_CALLER_CWD=str(Path.cwd()))  # relative --out/--write-md/--run: the caller's
    return subprocess.call([sys.executable, "-m", "benchmarks", args.kind, *rest], cwd=str(root), env=env)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="montrage", description="Attributable LoRA fine-tuning: record training "
                                 "dynamics into a Zarr run store, then attribute generations to training images and concepts.")
    ap.add_argument("--quiet", action="store_true", help="no progress bars, warnings only")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="LoRA fine-tuning with the montrage monitor (re-run to resume)",
                       description="Fine-tune a LoRA on an imagefolder (metadata.jsonl with file_name, text, "
                       "optional concept) and record training dynamics into OUTPUT/store.zarr.")
    p.add_argument("--data", required=True, help="imagefolder with metadata.jsonl")
    p.add_argument("--output", required=True, help="run folder (store.zarr, LoRA weights); an existing run resumes")
    _add_train_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="dataset -> monitored training -> attribute -> compare -> report, on the embedded default")
    p.add_argument("--out", default="montrage-demo", help="demo folder (default ./montrage-demo)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default 400; 120 with --quick)")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (for smoke tests)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("inspect", help="summary of a run store: checkpoints, sizes, concepts, probes")
    p.add_argument("run", help="run folder")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("attribute", help="attribute probes (or --images) to training images and concepts")
    p.add_argument("run", help="run folder")
    p.add_argument("--method", default="montrage", help="scorer: montrage, final-sim, tracin, dtrak, concept-trak, ... "
                   "(see `montrage bench list`)")
    p.add_argument("--checkpoint", type=int, default=None, help="training step to attribute at (default: last)")
    p.add_argument("--top-k", type=int, default=10, help="training images listed per query (default 10)")
    p.add_argument("--images", default=None, help="folder of query images instead of the run's probes")
    p.add_argument("--prompt", default=None, help="prompt of the query images (default: none, null-prompt features)")
    p.add_argument("--concept", default=None, help="Concept-TRAK: the phrase removed from the prompt, e.g. 'by artist-3'")
    p.add_argument("--condition", default="null", choices=["null", "caption"],
                   help="representations captured with the empty prompt (default) or the caption (leaks captions)")
    p.add_argument("--query-mode", default="B", choices=["A", "B"],
                   help="B: final images re-encoded under each checkpoint (default); A: probes as generated at each checkpoint")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="the run's base model folder, when it is no longer where the run recorded it")
    p.add_argument("--out", default=None, help="JSON output (default RUN/attribution_<method>_<step>.json)")
    p.add_argument("--show", type=int, default=12, help="queries printed to the terminal (default 12)")
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="score the training dynamics with dask: a scheduler address (tcp://host:8786), 'local' "
                   "(in-process LocalCluster) or 'threads'; the run folder must be readable by the workers "
                   "(default: in-process numpy)")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("compare", help="how attribution changed between checkpoints (JSON + PNG)")
    p.add_argument("run", help="run folder")
    p.add_argument("--method", default="montrage", help="scorer (default montrage)")
    p.add_argument("--from", dest="from_step", type=int, default=None, help="first training step (default: first)")
    p.add_argument("--to", dest="to_step", type=int, default=None, help="last training step (default: last)")
    p.add_argument("--out", default=None, help="JSON output (default RUN/compare_<method>.json)")
    p.add_argument("--plot", default=None, help="PNG output (default RUN/compare_<method>.png)")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="the run's base model folder, when it is no longer where the run recorded it")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="self-contained HTML attribution report")
    p.add_argument("run", help="run folder")
    p.add_argument("--method", default="montrage", help="scorer (default montrage)")
    p.add_argument("--out", default=None, help="HTML output (default RUN/report.html)")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="the run's base model folder, when it is no longer where the run recorded it")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("capture", help="featurize checkpoints the training loop only snapshotted (--capture deferred, "
                       "or left by a killed worker); resumable",
                       description="Featurize every pending checkpoint of RUN (training images, anchors, probes under "
                       "each snapshot's LoRA weights) and commit them in order. Re-run after an interruption to resume.")
    p.add_argument("run", help="run folder")
    p.add_argument("--num-processes", type=int, default=1,
                   help="local processes sharing the checkpoints (each writes its own; rank 0 commits in order)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads per process (default 1: bit-identical to "
                   "inline and background capture)")
    p.add_argument("--device", default="cpu", help="torch device of every process (default cpu)")
    p.add_argument("--dask-scheduler", default=None, metavar="ADDR",
                   help="featurize on a dask.distributed cluster (tcp://host:8786, or 'local'); workers need the "
                   "run folder at the same path")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("featurize", help="record the training images' projected LoRA gradients in the run "
                       "(dtrak/tracin/montrage then cost one query's gradients); resumable")
    p.add_argument("run", help="run folder")
    p.add_argument("--outputs", default="sqnorm,denoise",
                   help="output functions: sqnorm (D-TRAK), denoise (TracIn) (default both)")
    p.add_argument("--checkpoints", default=None, metavar="STEPS",
                   help="comma-separated training steps (default: every checkpoint after the first)")
    p.add_argument("--proj-dim", type=int, default=1024, help="random projection dimension (default 1024)")
    p.add_argument("--batch-size", type=int, default=32, help="items per batched per-sample gradient pass (default 32)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu); the projection is generated there")
    p.add_argument("--overwrite", action="store_true", help="replace features stored with other settings")
    p.set_defaults(func=cmd_featurize)

    p = sub.add_parser("fit", help="fit the fused attribution model of a run now (it is otherwise fitted on first "
                       "use); --retrains N adds counterfactual targets from LoRAs retrained on N training subsets")
    p.add_argument("run", help="run folder")
    p.add_argument("--retrains", type=int, default=0, metavar="N",
                   help="retrain the LoRA on N random subsets (cached in RUN/retrains/) and fit the prompt model "
                   "to their losses too; the fit reports a held-out LDS (4+ subsets; 8+ to resolve a gain, 16 where "
                   "LDS matters) and adopts the term only if it helps there; it also chooses, held out the same way, how much of a generation of a "
                   "training caption goes to images other than that caption's (0 when, as in a memorising run, the "
                   "loss follows that image alone). Costs N half-trainings, with montrage's loop and the run's "
                   "recorded training settings (your own loop: TrainingMonitor(..., training=TrainConfig(...)))")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the training images per subset (default 0.5)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps of each retraining (default: the run's steps x fraction, the same passes per image)")
    p.add_argument("--seed", type=int, default=0, help="seed of the subsets (default 0)")
    p.add_argument("--prior", default=None, metavar="DIR",
                   help="prior images, when the run's recorded prior folder has moved")
    p.add_argument("--methods", default="montrage",
                   help="fused models to fit, comma-separated: montrage, montrage-all, montrage-final (default montrage)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the fitted models as JSON")
    p.set_defaults(func=cmd_fit)

    p = sub.add_parser("bench", help="benchmarks, from a montrage checkout: attribution quality, cost, overhead, faults",
                       description="Runs `python -m benchmarks KIND ...` in a montrage source checkout (the "
                       "benchmarks are not installed with the library). Options after KIND go to the benchmark: "
                       "`montrage bench KIND --help` lists them (--quick, --seed, --dataset, --out, --write-md [PATH], ...).")
    p.add_argument("kind", choices=BENCH_KINDS,
                   help="which benchmark (concept: Concept-TRAK P@10 on the attribution run; list: the scorers)")
    p.add_argument("--repo", default=None, help="the montrage checkout holding benchmarks/ (default: the current "
                   "directory or a parent)")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, metavar="...",
                   help="options of the benchmark (see `montrage bench KIND --help`)")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except MontrageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``montrage bench attribution``: attribution quality of every registered scorer, with ground truth.

One monitored LoRA run on :mod:`benchmarks.datasets` data, then for each method variant:

* between-concept ("a {object} by {artist}" probes): top-1 concept accuracy (concept score = mean of the
  artist's top-3 image scores, as in ``montrage attribute``) and ROC AUC of the right artist's images
  against the rest, averaged over probes;
* exemplar ("{colour} {object} by {artist}" probes, one per training image): rank of the training image
  with exactly that (colour, object) among its artist's images -> Recall@1/5/10 and MRR (= mAP, one
  relevant item);
* mixed (generations from ``alpha E(prompt_a) + (1 - alpha) E(prompt_b)``, attributed as arbitrary
  images with the null prompt, query mode B): Spearman between artist a's share
  ``p_a / (p_a + p_b)`` of the concept proportions and alpha;
* self (training images re-noised with a second draw as queries): Recall@1 within the artist, a sanity
  check (the pixel baseline gets exactly 1.0);
* LDS: retrain the LoRA (no monitor) on ``lds_subsets`` seeded random halves of the training set, measure
  each probe's denoising loss (its final generation and prompt; fixed timesteps and noise) under each
  retrained model; LDS = mean over probes of spearman(-(sum of the probe's scores over the subset), loss)
  (see :mod:`benchmarks.metrics` for the sign convention).

Every figure gets a bootstrap 95% interval (resampled probes / queries), and each method a paired
bootstrap difference to ``final-sim`` on the same resamples. Writes ``results.json``, ``results.md``
and the score matrices (``scores/*.npz``) under ``out_dir``.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from montrage.analysis.attribute import attribute, concept_scores, proportions
from montrage.analysis.base import QuerySet, available
from montrage.analysis.queries import probe_queries, training_queries
from benchmarks import metrics as M
from benchmarks.datasets import BenchData, BenchDataConfig, MixedSpec, build_bench_data
from montrage.config import CaptureConfig, TrainConfig, to_dict
from montrage.data.imagefolder import load_imagefolder
from montrage.losses.diffusion import noised, per_sample_mse, training_target
from montrage.models.checkpoints import RunModel
from montrage.models.components import Conditioning, DiffusionComponents
from montrage.models.sampling import pixels_to_uint8, seeded_noise, uint8_to_pixels
from montrage.storage import RunStore
from montrage.storage import schema as S
from montrage.training import train

log = logging.getLogger(__name__)

GRADIENT_METHODS = ("tracin", "dtrak", "concept-trak")
REFERENCE = "final-sim"
# Does the training trajectory add information beyond the final checkpoint? Each pair differs only in that:
# same channels-combination rule (learned / equal weights), with vs without the earlier checkpoints.
DYNAMICS_ABLATION = (("montrage", "final-sim-learned"), ("montrage-unsupervised", "final-sim"),
                     ("dynamics-only", "final-sim"))
MIXED_ITEM_SEED0 = 900_000
LDS_NOISE_SEED = 4242
SIGN_CONVENTION = ("LDS(q) = spearman over retrained subsets m of (-(sum_{i in S_m} score(q, i)), L_m(q)) = "
                   "spearman(sum score, -L): higher attribution of the included images must predict a LOWER "
                   "denoising loss of probe q (model output f = -loss, TRAK's margin convention); this is D-TRAK's "
                   "evaluation exactly (sail-sg/D-TRAK: preds = masks @ (-scores).T; spearmanr(preds, mean loss of the "
                   "retrained models)); good methods have LDS > 0")
NOTES = ("Notes: variants without a suffix use null-prompt representations and query mode B (final images "
         "re-encoded under each checkpoint). `(caption)` variants condition on the captions / prompts, which name the "
         "artist: an upper reference, not a fair comparison. `(mode A)`: probes as generated at each checkpoint "
         "(probe queries only). `concept-trak` scores each query with its artist's phrase (`by artist-k`, the "
         "prompt's own phrase for probes; artist a's phrase for mixed; the caption's for self), so it is told the "
         "concept. Mixed queries carry no prompt. Exemplar R@k ranks within the exemplar's artist "
         "(per-artist images: R@k is 1 when k >= that count).")
METRICS: Tuple[Tuple[str, str], ...] = (
    ("between_top1", "between top-1"), ("between_auc", "between AUC"), ("exemplar_r1", "exemplar R@1"),
    ("exemplar_r5", "R@5"), ("exemplar_r10", "R@10"), ("exemplar_mrr", "MRR"), ("mixed_spearman", "mixed rho"),
    ("lds", "LDS"), ("self_r1", "self R@1"))


@dataclass
class AttributionBenchSettings:
    data: BenchDataConfig = field(default_factory=BenchDataConfig)
    steps: int = 400
    lr: float = 5e-3
    batch_size: int = 8
    prior_fraction: float = 0.25
    every_n_steps: int = 100  # checkpoints at 0, every, ..., steps
    probe_steps: int = 25
    capture_timesteps: Tuple[int, ...] = (100, 400, 700)
    anchors: int = 64
    lds_subsets: int = 16
    lds_steps: Optional[int] = None  # None: the same steps as the monitored run
    lds_fraction: float = 0.5
    lds_seed0: int = 1000  # subset m is drawn with seed lds_seed0 + m
    lds_timesteps: Tuple[int, ...] = (50, 150, 250, 350, 450, 550, 650, 750, 850, 950)
    n_bootstrap: int = 1000
    bootstrap_seed: int = 0
    seed: int = 0  # training seed (LoRA init, batches, noise) of every run
    methods: Optional[Tuple[str, ...]] = None  # None: every registered scorer (plus the variants)
    query_sets: Tuple[str, ...] = ("probes", "mixed", "self")

    def train_config(self, steps: Optional[int] = None) -> TrainConfig:
        return TrainConfig(steps=steps or self.steps, batch_size=self.batch_size, lr=self.lr,
                           prior_fraction=self.prior_fraction, seed=self.seed)

    def capture_config(self) -> CaptureConfig:
        return CaptureConfig(every_n_steps=self.every_n_steps, probe_steps=self.probe_steps,
                             timesteps=self.capture_timesteps, anchors=self.anchors)


FULL = AttributionBenchSettings()
QUICK = AttributionBenchSettings(data=BenchDataConfig(n_artists=4, per_artist=6, mixed_pairs=4), steps=160,
                                 every_n_steps=40, lds_subsets=4, n_bootstrap=1000)


@dataclass(frozen=True)
class Variant:
    label: str
    method: str
    condition: str = "null"
    mode: str = "B"


def method_variants(names: Sequence[str], only: Optional[Sequence[str]] = None) -> List[Variant]:
    """Every registered scorer (null prompt, query mode B), plus montrage mode A and caption-conditioned
    montrage / final-sim. ``only`` keeps variants whose method or label it names."""
    out = [Variant(n, n) for n in names]
    if "montrage" in names:
        out += [Variant("montrage (mode A)", "montrage", mode="A"),
                Variant("montrage (caption)", "montrage", condition="caption")]
    if "final-sim" in names:
        out.append(Variant("final-sim (caption)", "final-sim", condition="caption"))
    if only is not None:
        keep = set(only)
        out = [v for v in out if v.method in keep or v.label in keep]
    return out


# ----------------------------------------------------------------------------- generation
@torch.no_grad()
def generate_blend(components: DiffusionComponents, prompts_a: Sequence[str], prompts_b: Sequence[str],
                   alphas: Sequence[float], seeds: Sequence[int], num_steps: int = 25,
                   guidance_scale: float = 1.5) -> np.ndarray:
    """DDIM + CFG like :func:`montrage.models.sampling.generate`, conditioned on
    ``alpha * E(prompt_a) + (1 - alpha) * E(prompt_b)`` (prompt-encoder outputs)."""
    unet, sched, device = components.unet, components.sample_scheduler, components.device
    was_training = unet.training
    unet.eval()
    try:
        a = torch.tensor(list(alphas), dtype=torch.float32, device=device).view(-1, 1, 1)
        cond = a * components.encode_prompts(list(prompts_a)) + (1 - a) * components.encode_prompts(list(prompts_b))
        uncond = components.encode_prompts([""] * len(seeds))
        latents = seeded_noise(seeds, components.latent_shape).to(device) * sched.init_noise_sigma
        sched.set_timesteps(num_steps)
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([latents, latents]), t)
            pu, pc = components.predict(inp, t, Conditioning.cat([uncond, cond])).chunk(2)
            latents = sched.step(pu + guidance_scale * (pc - pu), t, latents).prev_sample
        return pixels_to_uint8(components.to_pixels(latents))
    finally:
        unet.train(was_training)


@torch.no_grad()
def probe_losses(components: DiffusionComponents, images: np.ndarray, prompts: Sequence[str],
                 timesteps: Sequence[int], noise_seed: int = LDS_NOISE_SEED, batch_size: int = 64) -> np.ndarray:
    """(Q,) mean (unweighted) denoising loss of each image with its prompt over ``timesteps``.

    The noise of (query q, timestep k) is a fixed draw seeded by (noise_seed, q, k): every model sees
    exactly the same noisy inputs.
    """
    unet, sched = components.unet, components.noise_scheduler
    was_training = unet.training
    unet.eval()
    out = np.zeros(len(images), np.float64)
    try:
        for s in range(0, len(images), batch_size):
            sl = slice(s, min(len(images), s + batch_size))
            x0 = components.to_latents(uint8_to_pixels(images[sl]).to(components.device))
            hidden = components.encode_prompts(list(prompts[sl]))
            for k, t in enumerate(timesteps):
                noise = seeded_noise([noise_seed * 1_000_003 + q * 131 + k for q in range(sl.start, sl.stop)],
                                     components.latent_shape).to(components.device)
                tt = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=components.device)
                pred = components.predict(noised(sched, x0, noise, tt), tt, hidden)
                out[sl] += per_sample_mse(pred, training_target(sched, x0, noise, tt)).double().cpu().numpy()
    finally:
        unet.train(was_training)
    return out / len(timesteps)


# ----------------------------------------------------------------------------- LDS retraining
def lds_subsets(n: int, m: int, fraction: float, seed0: int) -> List[Tuple[int, List[int]]]:
    """``m`` (seed, sorted indices) random subsets of size round(fraction * n), seed = seed0 + j."""
    size = max(1, int(round(fraction * n)))
    return [(seed0 + j, sorted(np.random.default_rng(seed0 + j).choice(n, size, replace=False).tolist()))
            for j in range(m)]


def _write_subset_folder(src: Path, dst: Path, indices: Sequence[int]) -> Path:
    lines = [ln for ln in (src / "metadata.jsonl").read_text().splitlines() if ln.strip()]
    dst.mkdir(parents=True, exist_ok=True)
    keep = []
    for i in indices:
        row = json.loads(lines[i])
        shutil.copy2(src / row["file_name"], dst / row["file_name"])
        keep.append(lines[i])
    (dst / "metadata.jsonl").write_text("\n".join(keep) + "\n")
    return dst


def retrain_subset(cache_root: Path, seed: int, indices: Sequence[int], data: BenchData, cfg: TrainConfig,
                   identity: dict) -> Tuple[Path, bool]:
    """Final LoRA of the run trained (without monitor) on ``indices``; cached in cache_root/subset-<seed>/.

    Returns (path, reused). The cache is reused only if its recorded subset, config and dataset match.
    """
    d = cache_root / f"subset-{seed}"
    lora, meta = d / S.FINAL_LORA_FILENAME, d / "subset.json"
    want = json.loads(json.dumps({"seed": seed, "indices": list(map(int, indices)), "train": to_dict(cfg), **identity}))
    if lora.is_file() and meta.is_file():
        try:
            if json.loads(meta.read_text()) == want:
                return lora, True
        except json.JSONDecodeError:
            pass
    shutil.rmtree(d, ignore_errors=True)
    sub = _write_subset_folder(data.data_dir, d / "data", indices)
    res = train(sub, d / "run", cfg=cfg, prior_dir=data.prior_dir, monitor=False, progress=False)
    shutil.move(str(res.final_lora), lora)
    shutil.rmtree(d / "run", ignore_errors=True)
    shutil.rmtree(d / "data", ignore_errors=True)
    meta.write_text(json.dumps(want, indent=1))
    return lora, False


def load_lora_file(path: Path) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- query sets
def mixed_queries(images: np.ndarray, specs: Sequence[MixedSpec]) -> QuerySet:
    """Mixed generations as arbitrary images: no prompt (null-prompt features), own noise seeds."""
    n = len(specs)
    return QuerySet(ids=[s.id for s in specs], images=images, prompts=[""] * n, seeds=[s.seed for s in specs],
                    item_seeds=[MIXED_ITEM_SEED0 + j for j in range(n)], concepts=[""] * n,
                    meta=[{"kind": "mixed", **dataclasses.asdict(s)} for s in specs])


def subset_queries(q: QuerySet, idx: Sequence[int]) -> QuerySet:
    idx = list(idx)
    pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
    return QuerySet(ids=pick(q.ids), images=q.images[idx], prompts=pick(q.prompts), seeds=pick(q.seeds),
                    item_seeds=pick(q.item_seeds),
                    probe_indices=[q.probe_indices[i] for i in idx] if q.probe_indices is not None else None,
                    concepts=pick(q.concepts), meta=pick(q.meta))


def score_variant(v: Variant, run_dir: Path, store: RunStore, qname: str, queries: QuerySet, cache: dict,
                  phrases: Optional[List[str]] = None) -> Optional[np.ndarray]:
    """(Q, N) scores of one variant on one query set; None where the variant does not apply."""
    if v.mode == "A" and queries.probe_indices is None:
        return None  # mode A needs the run's own probe trajectories
    opts = {"query_mode": v.mode}
    if v.method == "concept-trak":
        # Concept-TRAK attributes one named concept: each query gets the phrase of its artist ("by artist-k"),
        # one call per phrase (its training gradients do not depend on the queries).
        if phrases is None:
            return None
        out = None
        for phrase in sorted(set(phrases)):
            idx = [i for i, p in enumerate(phrases) if p == phrase]
            res = attribute(run_dir, v.method, queries=subset_queries(queries, idx), condition=v.condition,
                            options={**opts, "concept": phrase}, write_store=False, progress=False, store=store,
                            ctx_cache={})
            out = np.zeros((len(queries), res.scores.shape[1]), np.float32) if out is None else out
            out[idx] = res.scores
        return out
    res = attribute(run_dir, v.method, queries=queries, condition=v.condition, options=opts, write_store=False,
                    progress=False, store=store, ctx_cache=cache)
    return res.scores


# ----------------------------------------------------------------------------- metrics
def _fig(values: np.ndarray, n_boot: int, seed: int) -> dict:
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    return {"value": float(finite.mean()) if finite.size else None,
            "ci": list(M.mean_ci(v, n_boot, seed)) if finite.size else None, "n": int(finite.size)}


def per_query_metrics(S_probe: Optional[np.ndarray], S_mixed: Optional[np.ndarray], S_self: Optional[np.ndarray],
                      lds: Optional[np.ndarray], ctx: dict) -> Dict[str, np.ndarray]:
    """Per-item values of every metric (items = probes / mixed queries / training images)."""
    out: Dict[str, np.ndarray] = {}
    concepts = np.asarray(ctx["train_concepts"])
    if S_probe is not None:
        b, e = ctx["between"], ctx["exemplar"]
        if b:
            sub = S_probe[b]
            cs = concept_scores(sub, list(concepts))
            names = sorted(cs)
            mat = np.stack([cs[c] for c in names], 1)
            pred = [names[j] for j in mat.argmax(1)]
            out["between_top1"] = M.top1_correct(pred, [ctx["probe_concepts"][i] for i in b])
            out["between_auc"] = np.array([M.roc_auc(S_probe[i], concepts == ctx["probe_concepts"][i]) for i in b])
        if e:
            ranks = [M.rank_of(S_probe[i], ctx["targets"][i], np.flatnonzero(concepts == concepts[ctx["targets"][i]]))
                     for i in e]
            for k in (1, 5, 10):
                out[f"exemplar_r{k}"] = M.recall_at_k(ranks, k)
            out["exemplar_mrr"] = M.reciprocal_rank(ranks)
    if S_mixed is not None:
        out["mixed_share"] = mixed_shares(S_mixed, list(concepts), ctx["mixed_specs"])
    if S_self is not None:
        ranks = [M.rank_of(S_self[i], i, np.flatnonzero(concepts == concepts[i])) for i in range(len(concepts))]
        out["self_r1"] = M.recall_at_k(ranks, 1)
    if lds is not None:
        out["lds"] = lds
    return out


def mixed_shares(S_mixed: np.ndarray, concepts: List[str], specs: Sequence[MixedSpec]) -> np.ndarray:
    """Artist a's share p_a / (p_a + p_b) of the concept proportions (all artists) of each mixed query."""
    cs = concept_scores(S_mixed, concepts)
    out = np.zeros(len(specs))
    for q, s in enumerate(specs):
        p = proportions({c: float(v[q]) for c, v in cs.items()})
        tot = p[s.artist_a] + p[s.artist_b]
        out[q] = p[s.artist_a] / tot if tot > 0 else 0.5
    return out


def summarise(values: Dict[str, np.ndarray], alphas: np.ndarray, n_boot: int, seed: int) -> Dict[str, dict]:
    figs: Dict[str, dict] = {}
    for key, _ in METRICS:
        if key == "mixed_spearman":
            if "mixed_share" not in values:
                continue
            share = values["mixed_share"]
            stat = lambda i, s=share: M.spearman(s[i], alphas[i])  # noqa: E731
            val = M.spearman(share, alphas)
            figs[key] = {"value": None if np.isnan(val) else val,
                         "ci": list(M.bootstrap_ci(stat, len(share), n_boot, seed)), "n": int(len(share))}
        elif key in values:
            figs[key] = _fig(values[key], n_boot, seed)
    return figs


def differences(values: Dict[str, np.ndarray], ref: Dict[str, np.ndarray], alphas: np.ndarray, n_boot: int,
                seed: int) -> Dict[str, dict]:
    """Paired bootstrap differences (this method - reference) on the same resampled items."""
    out: Dict[str, dict] = {}
    for key, _ in METRICS:
        if key == "mixed_spearman":
            if "mixed_share" not in values or "mixed_share" not in ref:
                continue
            a, b = values["mixed_share"], ref["mixed_share"]
            d, lo, hi = M.paired_statistic_difference(lambda i: M.spearman(a[i], alphas[i]),
                                                      lambda i: M.spearman(b[i], alphas[i]), len(a), n_boot, seed)
        elif key in values and key in ref:
            d, lo, hi = M.paired_difference(values[key], ref[key], n_boot, seed)
        else:
            continue
        out[key] = {"diff": None if np.isnan(d) else d, "ci": [lo, hi]}
    return out


# ----------------------------------------------------------------------------- reporting
def _cell(fig: Optional[dict], key: str = "value") -> str:
    if not fig:
        return "n/a"
    if fig.get(key) is None:
        return "undef"  # e.g. a Spearman of constant values
    lo, hi = [float("nan") if x is None else x for x in (fig.get("ci") or (None, None))]
    return f"{fig[key]:.2f} [{lo:.2f}, {hi:.2f}]"


def markdown_table(results: dict) -> str:
    head = "| method | " + " | ".join(name for _, name in METRICS) + " |"
    sep = "|" + "---|" * (len(METRICS) + 1)
    rows = [head, sep]
    for label, r in results["methods"].items():
        if r.get("error"):
            rows.append(f"| {label} | error: {r['error'][:80]} |" + " |" * (len(METRICS) - 1))
            continue
        rows.append(f"| {label} | " + " | ".join(_cell(r["metrics"].get(k)) for k, _ in METRICS) + " |")
    lines = ["Value [bootstrap 95% interval]; n/a = not applicable to that variant; undef = undefined (constant "
             "scores, e.g. a Spearman of ties).", "", *rows, "", NOTES]
    if any(r.get("diff_vs_reference") for r in results["methods"].values()):
        lines += ["", f"Paired bootstrap difference to `{REFERENCE}` (same resampled items):", "", head, sep]
        for label, r in results["methods"].items():
            if label == REFERENCE or not r.get("diff_vs_reference"):
                continue
            lines.append(f"| {label} | " + " | ".join(_cell(r["diff_vs_reference"].get(k), "diff")
                                                    for k, _ in METRICS) + " |")
    if results.get("dynamics_ablation"):
        lines += ["", "**Do training dynamics add information beyond the final checkpoint?** Paired bootstrap "
                  "difference of each method with the trajectory minus the same method on the final checkpoint only:",
                  "", head.replace("| method |", "| with trajectory - final only |"), sep]
        for pair, d in results["dynamics_ablation"].items():
            lines.append(f"| {pair} | " + " | ".join(_cell(d.get(k), "diff") for k, _ in METRICS) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the benchmark
def run_attribution_bench(out_dir: str | Path, quick: bool = False,
                          settings: Optional[AttributionBenchSettings] = None,
                          echo: Callable[[str], None] = print) -> dict:
    """Run the attribution benchmark into ``out_dir``; returns the results dict (also results.json)."""
    s = settings or (QUICK if quick else FULL)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, object] = {}
    t_all = time.time()

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 2)
        echo(f"  [{name}] {timings[name]:.1f} s")

    # 1. data
    t0 = time.time()
    data = build_bench_data(out / "data", s.data)
    n_kind = {k: sum(p.kind == k for p in data.probes) for k in ("between", "exemplar")}
    echo(f"[1/6] data: {s.data.n_artists} artists x {s.data.per_artist} images ({len(data.rows)} training images), "
         f"probes {n_kind}, {len(data.mixed)} mixed generations")
    stage("data", t0)

    # 2. the monitored run (re-running resumes / reuses a finished run of the same configuration)
    t0 = time.time()
    run_dir = out / "run"
    train(data.data_dir, run_dir, cfg=s.train_config(), capture=s.capture_config(), probes_file=data.probes_file,
          prior_dir=data.prior_dir, monitor=True, progress=False)
    store = RunStore.open(run_dir)
    K = store.n_checkpoints
    echo(f"[2/6] monitored run: {s.steps} steps, checkpoints at steps {store.steps.tolist()} -> {run_dir}")
    stage("train_monitored", t0)

    # 3. queries: probes (final generations), mixed generations, training images
    t0 = time.time()
    probes = probe_queries(store, K - 1)
    kinds = [m.get("kind") for m in probes.meta]
    train_concepts = list(store.train_meta[S.ATTR_CONCEPTS])
    model = RunModel(store.run_config)
    comps = model.set_weights(store.lora_weights(K - 1), tag=K - 1)
    capture = store.capture
    mixed_images = generate_blend(comps, [m.prompts[0] for m in data.mixed], [m.prompts[1] for m in data.mixed],
                                  [m.alpha for m in data.mixed], [m.seed for m in data.mixed],
                                  int(capture["probe_steps"]), float(capture["guidance_scale"]))
    np.savez_compressed(out / "mixed_images.npz", images=mixed_images)
    query_sets: Dict[str, QuerySet] = {}
    if "probes" in s.query_sets:
        query_sets["probes"] = probes
    if "mixed" in s.query_sets:
        query_sets["mixed"] = mixed_queries(mixed_images, data.mixed)
    if "self" in s.query_sets:
        ts = load_imagefolder(data.data_dir, int(store.run_config["resolution"]))
        query_sets["self"] = training_queries(store, ts.images, range(len(ts)))
    phrases = {"probes": [f"by {c}" for c in probes.concepts],
               "mixed": [f"by {m.artist_a}" for m in data.mixed],
               "self": [f"by {c}" for c in train_concepts]}
    ctx = {"train_concepts": train_concepts, "probe_concepts": probes.concepts,
           "between": [i for i, k in enumerate(kinds) if k == "between"],
           "exemplar": [i for i, k in enumerate(kinds) if k == "exemplar"],
           "targets": {i: int(probes.meta[i]["target_index"]) for i, k in enumerate(kinds) if k == "exemplar"},
           "mixed_specs": data.mixed}
    echo(f"[3/6] queries: {', '.join(f'{k} {len(v)}' for k, v in query_sets.items())}")
    stage("queries", t0)

    # 4. scoring
    registered = available()
    skipped = {m: "not registered (available() does not list it)" for m in GRADIENT_METHODS if m not in registered}
    variants = method_variants(registered, s.methods)
    echo(f"[4/6] scoring {len(variants)} method variants: {', '.join(v.label for v in variants)}"
         + (f"; skipped {sorted(skipped)}" if skipped else ""))
    t0 = time.time()
    caches: Dict[str, dict] = {q: {} for q in query_sets}
    scores: Dict[str, Dict[str, Optional[np.ndarray]]] = {}
    errors: Dict[str, str] = {}
    score_times: Dict[str, float] = {}
    (out / "scores").mkdir(exist_ok=True)
    for v in variants:
        t1 = time.time()
        scores[v.label] = {}
        try:
            for qname, qs in query_sets.items():
                scores[v.label][qname] = score_variant(v, run_dir, store, qname, qs, caches[qname], phrases.get(qname))
        except Exception as exc:  # one failing method must not sink a long benchmark
            log.exception("scorer %s failed", v.label)
            errors[v.label] = f"{type(exc).__name__}: {exc}"
        score_times[v.label] = round(time.time() - t1, 2)
        np.savez_compressed(out / "scores" / f"{v.label.replace(' ', '_').replace('(', '').replace(')', '')}.npz",
                            **{k: a for k, a in scores[v.label].items() if a is not None})
        echo(f"    {v.label:<24} {score_times[v.label]:7.1f} s" + (f"  ERROR {errors[v.label]}" if v.label in errors else ""))
    timings["scoring_per_method"] = score_times
    stage("scoring", t0)

    # 5. LDS: retrain on random halves, measure each probe's loss under each retrained model
    t0 = time.time()
    lds_cfg = s.train_config(s.lds_steps or s.steps)
    subsets = lds_subsets(len(data.rows), s.lds_subsets, s.lds_fraction, s.lds_seed0)
    identity = {"dataset": store.train_meta[S.ATTR_DATASET_FINGERPRINT], "data_config": dataclasses.asdict(s.data)}
    losses = np.zeros((len(subsets), len(probes)))
    masks = np.zeros((len(subsets), len(data.rows)))
    reused = 0
    lds_model = RunModel(store.run_config)
    for j, (seed, idx) in enumerate(subsets):
        lora, was_cached = retrain_subset(out / "lds_cache", seed, idx, data, lds_cfg, identity)
        reused += was_cached
        masks[j, idx] = 1
        c = lds_model.set_weights(load_lora_file(lora), tag=None)
        losses[j] = probe_losses(c, probes.images, probes.prompts, s.lds_timesteps)
        echo(f"    subset {j + 1}/{len(subsets)} (seed {seed}, {len(idx)} images){' cached' if was_cached else ''}: "
             f"mean probe loss {losses[j].mean():.4f}")
    np.savez_compressed(out / "lds_losses.npz", losses=losses, masks=masks)
    echo(f"[5/6] LDS: {len(subsets)} retrained subsets ({reused} from cache)")
    stage("lds_retrain_and_losses", t0)

    # 6. metrics, bootstrap, report
    t0 = time.time()
    alphas = np.array([m.alpha for m in data.mixed])
    per_item: Dict[str, Dict[str, np.ndarray]] = {}
    methods: Dict[str, dict] = {}
    for v in variants:
        entry = {"method": v.method, "condition": v.condition, "query_mode": v.mode,
                 "score_seconds": score_times.get(v.label)}
        if v.label in errors:
            entry["error"] = errors[v.label]
            methods[v.label] = entry
            continue
        sc = scores[v.label]
        lds = M.lds_per_query(sc["probes"], masks, losses) if sc.get("probes") is not None and len(subsets) >= 2 else None
        per_item[v.label] = per_query_metrics(sc.get("probes"), sc.get("mixed"), sc.get("self"), lds, ctx)
        entry["metrics"] = summarise(per_item[v.label], alphas, s.n_bootstrap, s.bootstrap_seed)
        if lds is not None:
            entry["lds_by_kind"] = {k: _fig(lds[ctx[k]], s.n_bootstrap, s.bootstrap_seed) for k in ("between", "exemplar")
                                    if ctx[k]}
        methods[v.label] = entry
    if REFERENCE in per_item:
        for label, vals in per_item.items():
            if label != REFERENCE:
                methods[label]["diff_vs_reference"] = differences(vals, per_item[REFERENCE], alphas, s.n_bootstrap,
                                                                  s.bootstrap_seed)
    ablation = {f"{a} - {b}": differences(per_item[a], per_item[b], alphas, s.n_bootstrap, s.bootstrap_seed)
                for a, b in DYNAMICS_ABLATION if a in per_item and b in per_item}
    stage("metrics", t0)
    timings["total"] = round(time.time() - t_all, 2)

    results = {
        "benchmark": "attribution", "quick": bool(quick), "reference": REFERENCE, "dynamics_ablation": ablation,
        "settings": _jsonable(dataclasses.asdict(s)),
        "data": {"n_artists": s.data.n_artists, "per_artist": s.data.per_artist, "n_train": len(data.rows),
                 "probes": n_kind, "n_mixed": len(data.mixed), "alphas": sorted(set(alphas.tolist())),
                 "checkpoint_steps": store.steps.tolist()},
        "lds": {"subsets": len(subsets), "subset_seeds": [sd for sd, _ in subsets], "fraction": s.lds_fraction,
                "steps": lds_cfg.steps, "timesteps": list(s.lds_timesteps), "noise_seed": LDS_NOISE_SEED,
                "loss": "unweighted denoising MSE of the probe's final generation with its prompt, mean over timesteps",
                "sign_convention": SIGN_CONVENTION, "reused_from_cache": int(reused)},
        "skipped": skipped, "timings_s": timings, "methods": methods,
    }
    results = _jsonable(results)  # NaN -> None, numpy -> python: the returned dict equals results.json
    results["markdown"] = markdown_table(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results["markdown"] + "\n")
    store.close()
    echo(f"[6/6] wrote {out / 'results.json'} and {out / 'results.md'} (total {timings['total']:.0f} s)")
    return results


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x

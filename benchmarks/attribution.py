"""``montrage bench attribution``: every registered scorer on the queries users bring, with ground truth.

One monitored LoRA run per (dataset, seed) (:mod:`benchmarks.datasets`: ``synthetic`` artists or real
``typefaces``), cached in ``OUT/attribution-<dataset>-seed<seed>/``: re-running re-scores without retraining.
Query types (``QUERY_TYPES``), each scored by every registered method including ``text-only``:

* ``caption``: prompt = an exact training caption, generated at the final checkpoint -> between-concept
  top-1 (concept score = mean of the concept's top-3 image scores, as in ``montrage attribute``) and
  exemplar R@1 (rank of the caption's training image among ALL training images, pessimistic on ties);
* ``composition``: prompt = a concept with an object it was never trained with -> between top-1;
* ``image``: the caption generations given WITHOUT their prompt -> between top-1 and exemplar R@1;
* ``copy``: a perturbed copy (shift, noise, colour gain) of a training image, no prompt -> copy R@1;
* ``unseen``: a generator-rendered image in a concept's style, not in the training set, no prompt ->
  between top-1;
* ``mixed``: generations from a blend of two concepts' prompt embeddings, no prompt -> Spearman of concept
  a's share with alpha;
* LDS on the caption queries: retrain the LoRA (no monitor) on ``lds_subsets`` seeded random halves (same
  passes over each image: half the steps), measure each query's denoising loss under each retrained model;
  LDS = mean over queries of spearman(-(sum of the query's scores over the subset), loss)
  (:mod:`benchmarks.metrics` gives the sign convention).

Every figure gets a 95% bootstrap interval (resampled queries), and ``montrage`` a paired bootstrap
difference to every other method on the same resamples; :func:`verdicts` checks the issue's targets. Writes
``results.json``, ``results.md`` and the score matrices (``scores/*.npz``) under the run's folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from benchmarks import metrics as M
from benchmarks.datasets import BenchData, BenchDataConfig, MixedSpec, build_bench_data
from montrage.analysis.attribute import attribute, concept_scores, proportions
from montrage.analysis.base import QuerySet, available
from montrage.config import CaptureConfig, LoraSettings, TrainConfig, to_dict
from montrage.models.checkpoints import RunModel
from montrage.models.components import Conditioning, DiffusionComponents
from montrage.models.sampling import denoising_losses, generate, pixels_to_uint8, seeded_noise
from montrage.storage import RunStore
from montrage.storage import schema as S
from montrage.training import train

log = logging.getLogger(__name__)

FOCUS = "montrage"  # the method the targets are about
TEXT_BASELINE = "text-only"
TIE_TOLERANCE = 0.02  # tied-best: paired difference interval includes 0 and point estimate >= -0.02
LDS_MUST_BEAT = ("dtrak", "tracin", "final-sim")
# Does the training trajectory add information beyond the final checkpoint? Each pair differs only in that.
# montrage-all is the fused model forced to keep every channel: montrage itself may choose the final checkpoint's
DYNAMICS_ABLATION = (("montrage-all", "montrage-final"), ("montrage-dynamics", "final-sim-learned"),
                     ("montrage-unsupervised", "final-sim"))
QUERY_ITEM_SEED0 = 900_000
LDS_NOISE_SEED = 4242
SIGN_CONVENTION = ("LDS(q) = spearman over retrained subsets m of (-(sum_{i in S_m} score(q, i)), L_m(q)): higher "
                   "attribution of the included images must predict a LOWER denoising loss of query q (D-TRAK's "
                   "evaluation: preds = masks @ (-scores).T; spearmanr(preds, loss)); good methods have LDS > 0")

# (query type, metric key, label, target or None)
HEADLINE: Tuple[Tuple[str, str, str, Optional[float]], ...] = (
    ("caption", "between_top1", "caption: between top-1", 0.95),
    ("caption", "exemplar_r1", "caption: exemplar R@1", 0.85),
    ("composition", "between_top1", "new composition: between top-1", 0.95),
    ("image", "between_top1", "image only (generation): between top-1", 0.95),
    ("image", "exemplar_r1", "image only (generation): exemplar R@1", 0.85),
    ("copy", "copy_r1", "image only (perturbed copy): R@1", 0.95),
    ("unseen", "between_top1", "image only (unseen, concept's style): between top-1", 0.95),
    ("caption", "lds", "LDS (caption queries)", 0.30),
    ("mixed", "mixed_spearman", "mixed prompts: Spearman(share, alpha)", None),
)
QUERY_TYPES: Dict[str, str] = {
    "caption": "prompt = an exact training caption",
    "composition": "prompt = a concept with an object it never drew",
    "image": "the caption generations without their prompt",
    "copy": "perturbed copy of a training image, no prompt",
    "unseen": "unseen image in a concept's style, no prompt",
    "mixed": "blend of two concepts' prompts, no prompt given",
}


@dataclass
class AttributionBenchSettings:
    data: BenchDataConfig = field(default_factory=BenchDataConfig)
    steps: int = 400
    lr: float = 5e-3
    rank: int = 8
    batch_size: int = 8
    prior_fraction: float = 0.25  # synthetic only (typefaces have no prior folder)
    every_n_steps: int = 100  # checkpoints at 0, every, ..., steps
    probe_steps: int = 25  # DDIM steps of the monitor's probes and of every generated query
    guidance_scale: float = 1.5
    capture_timesteps: Tuple[int, ...] = (100, 400, 700)
    anchors: int = 32
    lds_subsets: int = 20  # per-query Spearman over 5 subsets moved in steps of 0.1 and its intervals were wide
    lds_fraction: float = 0.5
    lds_seed0: int = 1000  # subset m is drawn with seed lds_seed0 + 100 * seed + m
    lds_timesteps: Tuple[int, ...] = (100, 300, 500, 700, 900)
    n_bootstrap: int = 1000
    seed: int = 0  # data, training, queries, LDS subsets and bootstrap
    methods: Optional[Tuple[str, ...]] = None  # None: every registered scorer but ``exclude``
    # Concept-TRAK answers a named concept (its own benchmark: ``bench concept``); per query it inverts the DDIM
    # trajectory, ~10x the cost of every other method here together, so it is left out unless asked for.
    exclude: Tuple[str, ...] = ("concept-trak",)

    @property
    def lds_steps(self) -> int:
        """Retrains see each image as often as the full run: steps x subset fraction."""
        return max(1, int(round(self.steps * self.lds_fraction)))

    def train_config(self, steps: Optional[int] = None) -> TrainConfig:
        prior = self.prior_fraction if self.data.dataset == "synthetic" else 0.0
        return TrainConfig(steps=steps or self.steps, batch_size=self.batch_size, lr=self.lr, prior_fraction=prior,
                           seed=self.seed, lora=LoraSettings(rank=self.rank))

    def capture_config(self) -> CaptureConfig:
        return CaptureConfig(every_n_steps=self.every_n_steps, probe_steps=self.probe_steps,
                             guidance_scale=self.guidance_scale, timesteps=self.capture_timesteps, anchors=self.anchors)


def settings_for(dataset: str = "synthetic", seed: int = 0, quick: bool = False,
                 variant: Optional[Dict[str, object]] = None) -> AttributionBenchSettings:
    """The default (or ``--quick``) settings of one (dataset, seed); ``variant`` overrides the LoRA training
    (``steps``, ``rank``, ``lr``) and the number of LDS subsets (``lds_subsets``), e.g. to train as long as the
    quality gate does; checkpoints stay 5 (every steps / 4)."""
    s = _default_settings(dataset, seed, quick)
    changes = {k: v for k, v in (variant or {}).items() if v is not None}
    unknown = set(changes) - set(VARIANT_KEYS)
    if unknown:
        raise ValueError(f"unknown variant settings {sorted(unknown)}; known: {list(VARIANT_KEYS)}")
    if "steps" in changes:
        changes["every_n_steps"] = max(1, int(changes["steps"]) // 4)
    return dataclasses.replace(s, **changes)


VARIANT_KEYS = ("steps", "rank", "lr", "lds_subsets")


def variant_tag(s: AttributionBenchSettings, dataset: str, seed: int, quick: bool) -> str:
    """'' for the default settings of (dataset, seed), else a folder/section suffix naming what differs, so that a
    variant never overwrites (or is summarised as) the default benchmark."""
    base = _default_settings(dataset, seed, quick)
    names = {"steps": "steps", "rank": "rank", "lr": "lr", "lds_subsets": "lds"}
    return "".join(f"-{names[k]}{getattr(s, k):g}" for k in VARIANT_KEYS if getattr(s, k) != getattr(base, k))


def _default_settings(dataset: str, seed: int, quick: bool) -> AttributionBenchSettings:
    if quick:
        data = BenchDataConfig(dataset=dataset, n_concepts=4, per_concept=4, queries_per_concept=2,
                               composition_seeds=2, mixed_pairs=2, n_prior=8, seed=seed)
        return AttributionBenchSettings(data=data, steps=40, every_n_steps=20, probe_steps=5, capture_timesteps=(100, 500),
                                        anchors=4, lds_subsets=2, lds_timesteps=(100, 500, 900), n_bootstrap=200,
                                        seed=seed)
    # 7 queries per concept and type (56 per type): one query moves a figure by 1/56 = .018, under the tie tolerance,
    # so a tied-best verdict is not decided by one query as it was with 32 (.031, until session 14). Query counts
    # leave the training data as it is (BenchDataConfig.QUERY_FIELDS): runs and retrains are reused.
    data = BenchDataConfig(dataset=dataset, queries_per_concept=7, composition_seeds=7, mixed_pairs=4, seed=seed)
    # Both sets are trained as `montrage train` trains 64 images (its resolved defaults; the quality gates train so):
    # at 600 steps, rank 8, lr 0.005 typeface generations were weakly recognisable and image-only between-concept
    # top-1 was .38-.56 for every method (until session 7); at 400 steps, rank 8, lr 0.005 synthetic image-only
    # exemplar R@1 was .62 / .88 (seeds 0 / 1) against .88 / .97 trained so (until session 8). Both stay variants.
    return AttributionBenchSettings(data=data, steps=1600, every_n_steps=400, rank=16, lr=2e-3, seed=seed)


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
    """(Q,) mean denoising loss of each image with its prompt over ``timesteps`` (the library's
    :func:`montrage.models.sampling.denoising_losses`, with the benchmark's LDS noise seed)."""
    return denoising_losses(components, images, prompts, timesteps, noise_seed, batch_size)


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
    from montrage.retrains import retrained_lora

    want = {"seed": seed, "indices": list(map(int, indices)), "train": to_dict(cfg), **identity}
    return retrained_lora(cache_root / f"subset-{seed}", want,
                          lambda dst: _write_subset_folder(data.data_dir, dst, indices), cfg, prior_dir=data.prior_dir)


def load_lora_file(path: Path) -> Dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


# ----------------------------------------------------------------------------- query sets
def query_set(name: str, images: np.ndarray, prompts: Sequence[str], concepts: Sequence[str],
              meta: Optional[Sequence[dict]] = None, seeds: Optional[Sequence[Optional[int]]] = None) -> QuerySet:
    n = len(images)
    offset = QUERY_ITEM_SEED0 + 10_000 * list(QUERY_TYPES).index(name)
    return QuerySet(ids=[f"{name}-{j}" for j in range(n)], images=np.ascontiguousarray(images), prompts=list(prompts),
                    seeds=list(seeds) if seeds is not None else [None] * n,
                    item_seeds=[offset + j for j in range(n)], concepts=list(concepts),
                    meta=list(meta) if meta is not None else [{"kind": name} for _ in range(n)])


def concept_phrase(dataset: str, concept: str) -> str:
    """The words of a prompt that name its concept (what Concept-TRAK is told to attribute)."""
    return f"in {concept}" if dataset == "typefaces" else f"by {concept}"


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def build_queries(data: BenchData, store: RunStore, s: AttributionBenchSettings, cache: Path,
                  echo: Callable[[str], None]) -> Dict[str, QuerySet]:
    """Every query set; generations at the final checkpoint are cached (keyed by the LoRA and the specs)."""
    K = store.n_checkpoints
    lora = store.lora_weights(K - 1)
    key = _digest(*[lora[k] for k in sorted(lora)], [p.to_json() for p in data.caption_queries],
                  [p.to_json() for p in data.composition_queries], [dataclasses.asdict(m) for m in data.mixed],
                  s.probe_steps, s.guidance_scale)
    if cache.is_file():
        z = np.load(cache)
        if str(z["key"]) == key:
            gen = {k: z[k] for k in ("caption", "composition", "mixed")}
        else:
            gen = None
    else:
        gen = None
    if gen is None:
        comps = RunModel(store.run_config).set_weights(lora, tag=K - 1)
        t0 = time.time()
        gen = {"caption": generate(comps, [p.prompt for p in data.caption_queries], [p.seed for p in data.caption_queries],
                                   s.probe_steps, s.guidance_scale),
               "composition": generate(comps, [p.prompt for p in data.composition_queries],
                                       [p.seed for p in data.composition_queries], s.probe_steps, s.guidance_scale),
               "mixed": generate_blend(comps, [m.prompt_a for m in data.mixed], [m.prompt_b for m in data.mixed],
                                       [m.alpha for m in data.mixed], [m.seed for m in data.mixed], s.probe_steps,
                                       s.guidance_scale)}
        np.savez_compressed(cache, key=np.array(key), **gen)
        echo(f"    generated {sum(len(v) for v in gen.values())} query images in {time.time() - t0:.1f} s")
    cq, pq = data.caption_queries, data.composition_queries
    targets = [{"kind": "caption", "target_index": p.meta["target_index"]} for p in cq]
    return {
        "caption": query_set("caption", gen["caption"], [p.prompt for p in cq], [p.concept for p in cq], targets,
                             [p.seed for p in cq]),
        "composition": query_set("composition", gen["composition"], [p.prompt for p in pq], [p.concept for p in pq],
                                 [{"kind": "composition", **p.meta} for p in pq], [p.seed for p in pq]),
        "image": query_set("image", gen["caption"], [""] * len(cq), [p.concept for p in cq],
                           [{**t, "kind": "image"} for t in targets], [p.seed for p in cq]),
        "copy": query_set("copy", data.copy_images, [""] * len(data.copy_targets),
                          [data.rows[i]["concept"] for i in data.copy_targets],
                          [{"kind": "copy", "target_index": int(i)} for i in data.copy_targets]),
        "unseen": query_set("unseen", data.unseen_images, [""] * len(data.unseen_concepts), data.unseen_concepts,
                            [{"kind": "unseen", "object": o} for o in data.unseen_objects]),
        "mixed": query_set("mixed", gen["mixed"], [""] * len(data.mixed), [m.concept_a for m in data.mixed],
                           [{"kind": "mixed", **dataclasses.asdict(m)} for m in data.mixed], [m.seed for m in data.mixed]),
    }


def subset_queries(q: QuerySet, idx: Sequence[int]) -> QuerySet:
    idx = list(idx)
    pick = lambda xs: [xs[i] for i in idx] if xs else []  # noqa: E731
    return QuerySet(ids=pick(q.ids), images=q.images[idx], prompts=pick(q.prompts), seeds=pick(q.seeds),
                    item_seeds=pick(q.item_seeds),
                    probe_indices=[q.probe_indices[i] for i in idx] if q.probe_indices is not None else None,
                    concepts=pick(q.concepts), meta=pick(q.meta))


def score_method(method: str, run_dir: Path, store: RunStore, queries: QuerySet, cache: dict,
                 dataset: str) -> Optional[np.ndarray]:
    """(Q, N) scores of one method on one query set; None where the method does not apply."""
    if method == "concept-trak":
        # Concept-TRAK attributes a named concept: each query gets its concept's phrase ("by artist-k" /
        # "in face"), one call per phrase. Without a prompt there is nothing to remove the phrase from.
        if not all(p.strip() for p in queries.prompts):
            return None
        phrases = [concept_phrase(dataset, c) for c in queries.concepts]
        out = None
        for phrase in sorted(set(phrases)):
            idx = [i for i, p in enumerate(phrases) if p == phrase]
            res = attribute(run_dir, method, queries=subset_queries(queries, idx),
                            options={"query_mode": "B", "concept": phrase}, write_store=False, progress=False,
                            store=store, ctx_cache=cache)  # its training side is cached across phrases
            out = np.zeros((len(queries), res.scores.shape[1]), np.float32) if out is None else out
            out[idx] = res.scores
        return out
    res = attribute(run_dir, method, queries=queries, options={"query_mode": "B"}, write_store=False,
                    progress=False, store=store, ctx_cache=cache)
    return np.asarray(res.scores)


# ----------------------------------------------------------------------------- metrics
def _fig(values: np.ndarray, n_boot: int, seed: int) -> dict:
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    return {"value": float(finite.mean()) if finite.size else None,
            "ci": list(M.mean_ci(v, n_boot, seed)) if finite.size else None, "n": int(finite.size)}


def between_correct(scores: np.ndarray, train_concepts: Sequence[str], expected: Sequence[str]) -> np.ndarray:
    """1 where the top concept (mean of its top-3 image scores) is the expected one. Ties go to the first
    concept in sorted order, so constant scores get chance (1 / #concepts on balanced queries)."""
    cs = concept_scores(scores, list(train_concepts))
    names = sorted(cs)
    mat = np.stack([cs[c] for c in names], 1)
    return M.top1_correct([names[j] for j in mat.argmax(1)], list(expected))


def target_ranks(scores: np.ndarray, targets: Sequence[int]) -> List[int]:
    """Pessimistic rank of each query's target among ALL training images."""
    return [M.rank_of(scores[q], int(t)) for q, t in enumerate(targets)]


def per_query_metrics(scores: Dict[str, Optional[np.ndarray]], queries: Dict[str, QuerySet],
                      train_concepts: Sequence[str], lds: Optional[np.ndarray]) -> Dict[str, Dict[str, np.ndarray]]:
    """{query type: {metric: per-item values}} (mixed: the per-query share of concept a)."""
    out: Dict[str, Dict[str, np.ndarray]] = {}
    for name, q in queries.items():
        sc = scores.get(name)
        if sc is None:
            continue
        m: Dict[str, np.ndarray] = {}
        if name in ("caption", "composition", "image", "unseen"):
            m["between_top1"] = between_correct(sc, train_concepts, q.concepts)
        if name in ("caption", "image"):
            ranks = target_ranks(sc, [x["target_index"] for x in q.meta])
            m["exemplar_r1"] = M.recall_at_k(ranks, 1)
            m["exemplar_r5"] = M.recall_at_k(ranks, 5)
            m["exemplar_mrr"] = M.reciprocal_rank(ranks)
        if name == "copy":
            ranks = target_ranks(sc, [x["target_index"] for x in q.meta])
            m["copy_r1"] = M.recall_at_k(ranks, 1)
            m["copy_mrr"] = M.reciprocal_rank(ranks)
        if name == "mixed":
            m["mixed_share"] = mixed_shares(sc, list(train_concepts), [x for x in q.meta])
        if name == "caption" and lds is not None:
            m["lds"] = lds
        out[name] = m
    return out


def mixed_shares(scores: np.ndarray, concepts: List[str], specs: Sequence[dict]) -> np.ndarray:
    """Concept a's share p_a / (p_a + p_b) of the concept proportions of each mixed query."""
    cs = concept_scores(scores, concepts)
    out = np.zeros(len(specs))
    for q, s in enumerate(specs):
        p = proportions({c: float(v[q]) for c, v in cs.items()})
        tot = p[s["concept_a"]] + p[s["concept_b"]]
        out[q] = p[s["concept_a"]] / tot if tot > 0 else 0.5
    return out


def summarise(values: Dict[str, Dict[str, np.ndarray]], alphas: np.ndarray, n_boot: int, seed: int) -> Dict[str, dict]:
    """{query type: {metric: {value, ci, n}}}."""
    figs: Dict[str, dict] = {}
    for qtype, mets in values.items():
        figs[qtype] = {}
        for key, v in mets.items():
            if key == "mixed_share":
                stat = lambda i, s=v: M.spearman(s[i], alphas[i])  # noqa: E731
                val = M.spearman(v, alphas)
                figs[qtype]["mixed_spearman"] = {"value": None if np.isnan(val) else val,
                                                 "ci": list(M.bootstrap_ci(stat, len(v), n_boot, seed)), "n": int(len(v))}
            else:
                figs[qtype][key] = _fig(v, n_boot, seed)
    return figs


def differences(a: Dict[str, Dict[str, np.ndarray]], b: Dict[str, Dict[str, np.ndarray]], alphas: np.ndarray,
                n_boot: int, seed: int) -> Dict[str, Dict[str, dict]]:
    """Paired bootstrap differences (a - b) per query type and metric, on the same resampled items."""
    out: Dict[str, Dict[str, dict]] = {}
    for qtype in a:
        if qtype not in b:
            continue
        out[qtype] = {}
        for key in a[qtype]:
            if key not in b[qtype]:
                continue
            if key == "mixed_share":
                x, y = a[qtype][key], b[qtype][key]
                d, lo, hi = M.paired_statistic_difference(lambda i: M.spearman(x[i], alphas[i]),
                                                          lambda i: M.spearman(y[i], alphas[i]), len(x), n_boot, seed)
                key = "mixed_spearman"
            else:
                d, lo, hi = M.paired_difference(a[qtype][key], b[qtype][key], n_boot, seed)
            out[qtype][key] = {"diff": None if np.isnan(d) else d, "ci": [lo, hi]}
    return out


def verdicts(results: dict, focus: str = FOCUS) -> List[dict]:
    """One row per headline metric: is ``focus`` best or tied-best, does it meet the target, by how much not."""
    methods = results["methods"]
    rows = []
    if focus not in methods or "metrics" not in methods[focus]:
        return rows
    for qtype, key, label, target in HEADLINE:
        fig = methods[focus]["metrics"].get(qtype, {}).get(key)
        if not fig or fig.get("value") is None:
            continue
        value = fig["value"]
        worst = None  # the other method whose paired difference is most against focus
        best_other = None
        for other, r in methods.items():
            if other == focus or "metrics" not in r:
                continue
            ofig = r["metrics"].get(qtype, {}).get(key)
            if ofig and ofig.get("value") is not None and (best_other is None or ofig["value"] > best_other[1]):
                best_other = (other, ofig["value"])
            d = methods[focus].get("diff_vs", {}).get(other, {}).get(qtype, {}).get(key)
            if not d or d.get("diff") is None:
                continue
            if worst is None or d["diff"] < worst[1]["diff"]:
                worst = (other, d)
        tied_best = True
        if worst is not None:
            diff, (lo, hi) = worst[1]["diff"], worst[1]["ci"]
            tied_best = diff >= -TIE_TOLERANCE and (hi is None or hi >= 0)
        row = {"query_type": qtype, "metric": key, "label": label, "value": value, "ci": fig.get("ci"),
               "best_other": best_other, "worst_diff": worst, "best_or_tied": tied_best, "target": target,
               "target_met": None if target is None else value >= target,
               "target_gap": None if target is None else round(value - target, 4)}
        if key == "lds":
            beats = {}
            for other in LDS_MUST_BEAT:
                d = methods[focus].get("diff_vs", {}).get(other, {}).get(qtype, {}).get(key)
                beats[other] = bool(d and d.get("diff") is not None and d["ci"][0] is not None and d["ci"][0] > 0)
            row["lds_beats"] = beats
            row["target_met"] = row["target_met"] and all(beats.values())
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- reporting
def _cell(fig: Optional[dict], key: str = "value") -> str:
    if not fig:
        return "n/a"
    if fig.get(key) is None:
        return "undef"
    lo, hi = [float("nan") if x is None else x for x in (fig.get("ci") or (None, None))]
    return f"{fig[key]:.2f} [{lo:.2f}, {hi:.2f}]"


def _metric_columns(qtype: str) -> List[Tuple[str, str]]:
    cols = {"caption": [("between_top1", "between top-1"), ("exemplar_r1", "exemplar R@1"), ("exemplar_mrr", "MRR"),
                        ("lds", "LDS")],
            "composition": [("between_top1", "between top-1")],
            "image": [("between_top1", "between top-1"), ("exemplar_r1", "exemplar R@1"), ("exemplar_mrr", "MRR")],
            "copy": [("copy_r1", "R@1"), ("copy_mrr", "MRR")],
            "unseen": [("between_top1", "between top-1")],
            "mixed": [("mixed_spearman", "Spearman(share, alpha)")]}
    return cols[qtype]


def markdown_tables(results: dict, focus: str = FOCUS) -> str:
    """Per query type: one row per method, value [95% CI] and the paired difference montrage - method."""
    lines: List[str] = []
    methods = results["methods"]
    for qtype, desc in QUERY_TYPES.items():
        cols = _metric_columns(qtype)
        n = next((r["metrics"][qtype][k]["n"] for r in methods.values() if qtype in r.get("metrics", {})
                  for k, _ in cols if k in r["metrics"][qtype]), 0)
        lines += [f"**{qtype}** ({desc}; {results['queries'].get(qtype, n)} queries)", ""]
        head = ["method"] + [c for _, c in cols] + [f"{focus} - method: {c}" for _, c in cols]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for label, r in methods.items():
            if r.get("error"):
                lines.append(f"| {label} | error: {r['error'][:90]} |" + " |" * (len(head) - 2))
                continue
            mets = r.get("metrics", {}).get(qtype)
            diff = r.get("diff_from_focus", {}).get(qtype, {})
            cells = [_cell((mets or {}).get(k)) for k, _ in cols]
            dcells = ["-" if label == focus else _cell(diff.get(k), "diff") for k, _ in cols]
            lines.append(f"| {label} | " + " | ".join(cells + dcells) + " |")
        lines.append("")
    return "\n".join(lines)


def verdict_table(rows: List[dict], focus: str = FOCUS) -> str:
    out = [f"| metric | {focus} [95% CI] | best other | worst paired diff ({focus} - other) [CI] | best or tied-best | "
           "target | met |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        bo = f"{r['best_other'][0]} {r['best_other'][1]:.2f}" if r["best_other"] else "-"
        if r["worst_diff"]:
            other, d = r["worst_diff"]
            wd = f"vs {other}: {d['diff']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"
        else:
            wd = "-"
        tb = "yes" if r["best_or_tied"] else f"**no** (by {-(r['worst_diff'][1]['diff']):.2f})"
        tgt = "-" if r["target"] is None else f">= {r['target']:.2f}"
        if r["target_met"] is None:
            met = "-"
        elif r["target_met"]:
            met = "yes"
        else:
            met = f"**no** ({r['target_gap']:+.2f})" if r["target_gap"] < 0 else "**no**"
            if r.get("lds_beats") and not all(r["lds_beats"].values()):
                met += " not above " + ", ".join(k for k, v in r["lds_beats"].items() if not v)
        out.append(f"| {r['label']} | {_cell({'value': r['value'], 'ci': r['ci']})} | {bo} | {wd} | {tb} | {tgt} | {met} |")
    return "\n".join(out)


def ablation_table(results: dict) -> str:
    abl = results.get("dynamics_ablation") or {}
    if not abl:
        return ""
    out = ["| with trajectory - final checkpoint only | " + " | ".join(lbl for _, _, lbl, _ in HEADLINE) + " |",
           "|" + "---|" * (len(HEADLINE) + 1)]
    for pair, d in abl.items():
        out.append(f"| {pair} | " + " | ".join(_cell(d.get(q, {}).get(k), "diff") for q, k, _, _ in HEADLINE) + " |")
    return "\n".join(out)


def markdown(results: dict) -> str:
    parts = ["Value [bootstrap 95% interval]; n/a = not applicable (e.g. concept-trak without a prompt); undef = "
             "undefined (constant scores). Between top-1: a tie between concepts goes to the first in sorted order "
             "(chance on balanced queries); R@1 ranks the target among ALL training images and counts ties against "
             "it, so a method without information (text-only on image-only queries) is at 0.",
             "", markdown_tables(results)]
    if results.get("verdicts"):
        parts += [f"**Verdict against the issue's targets** ({FOCUS}; best or tied-best = every paired difference "
                  f"interval to another method includes or exceeds 0 and its point estimate is >= -{TIE_TOLERANCE}):",
                  "", verdict_table(results["verdicts"]), ""]
    abl = ablation_table(results)
    if abl:
        parts += ["**Dynamics ablation** (paired difference, same model with vs without the earlier checkpoints):", "",
                  abl, ""]
    return "\n".join(parts)


# ----------------------------------------------------------------------------- the benchmark
def finished_run(run_dir: Path, s: AttributionBenchSettings, data_dir: Optional[Path] = None) -> bool:
    """A cached run of these training settings that reached its last step: reused as is, even when capture
    defaults of the library changed since (it is re-scored, not retrained). A run of other settings, or (given
    ``data_dir``) of other training data, is an error: query-set sizes may change over a cached run, data may not."""
    from montrage.data.imagefolder import load_imagefolder
    from montrage.errors import StoreError

    try:
        store = RunStore.open(run_dir)
    except StoreError:
        return False
    try:
        t, want = store.run_config.get("train", {}), s.train_config()
        got = (t.get("steps"), t.get("lr"), t.get("seed"), t.get("batch_size"), (t.get("lora") or store.run_config.get("lora") or {}).get("rank"))
        if got != (want.steps, want.lr, want.seed, want.batch_size, want.lora.rank):
            raise RuntimeError(f"{run_dir} holds a run of other settings {got}; delete it (or use another --out) to "
                               "retrain with these")
        if data_dir is not None:
            here = load_imagefolder(data_dir, int(store.run_config.get("resolution") or s.data.resolution)).fingerprint()
            if here != store.train_meta.get(S.ATTR_DATASET_FINGERPRINT):
                raise RuntimeError(f"{run_dir} was trained on other data than {data_dir}; delete it (or use another "
                                   "--out) to retrain on this data")
        return store.n_checkpoints > 0 and int(store.steps[-1]) == want.steps
    finally:
        store.close()


def run_dir_for(out: str | Path, dataset: str, seed: int, quick: bool, tag: str = "") -> Path:
    return Path(out) / (f"attribution-{dataset}-seed{seed}" + ("-quick" if quick else "") + tag)


def run_attribution_bench(out_dir: str | Path, quick: bool = False, settings: Optional[AttributionBenchSettings] = None,
                          echo: Callable[[str], None] = print, dataset: str = "synthetic", seed: int = 0,
                          prepare_only: bool = False, rescore: Optional[Sequence[str]] = None,
                          retrains: int = 0) -> dict:
    """Run the attribution benchmark of one (dataset, seed) into ``out_dir``; returns the results (also
    ``results.json``). The monitored run, the generated queries and the LDS retrains are cached there;
    ``prepare_only`` builds just those (no scoring), so scorers can be re-scored later without retraining;
    ``rescore`` (method names): recompute only these, and reuse the saved scores of every other method that were
    computed on exactly these queries (``scores/<method>.npz``); ``retrains`` N > 0: ``montrage fit --retrains N``
    on the run first (cached beside it), so the fused model is also fitted to counterfactual targets (subsets drawn
    apart from the LDS subsets it is scored on)."""
    s = settings or settings_for(dataset, seed, quick)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: Dict[str, object] = {}
    t_all = time.time()

    def stage(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 2)
        echo(f"  [{name}] {timings[name]:.1f} s")

    t0 = time.time()
    data = build_bench_data(out / "data", s.data)
    echo(f"[1/6] data ({s.data.dataset}, seed {s.data.seed}): {len(data.concept_names)} concepts, {len(data.rows)} "
         f"training images, held out {data.heldout}")
    stage("data", t0)

    t0 = time.time()
    run_dir = out / "run"
    if not finished_run(run_dir, s, data.data_dir):
        # inline capture: a niced background worker starves on a busy machine, and the timings stay one process's
        train(data.data_dir, run_dir, cfg=s.train_config(), capture=s.capture_config(), probes_file=data.probes_file,
              prior_dir=data.prior_dir, monitor=True, progress=False, capture_mode="inline")
    store = RunStore.open(run_dir)
    echo(f"[2/6] monitored run: {s.steps} steps, checkpoints at steps {store.steps.tolist()} -> {run_dir}")
    stage("train_monitored", t0)

    t0 = time.time()
    queries = build_queries(data, store, s, out / "queries.npz", echo)
    train_concepts = list(store.train_meta[S.ATTR_CONCEPTS])
    echo(f"[3/6] queries: {', '.join(f'{k} {len(v)}' for k, v in queries.items())}")
    stage("queries", t0)

    retrain_info: Dict[str, object] = {"n": 0}
    if retrains and not prepare_only:
        from montrage.retrains import retrain

        t0 = time.time()
        # the bench's own prior folder: the run records an absolute path, which moves with the output folder
        rr = retrain(run_dir, int(retrains), progress=False, prior_dir=data.prior_dir)
        retrain_info["reused"] = rr.reused
        echo(f"[3b/6] counterfactual targets: {retrains} retrained subsets ({rr.reused} from cache) -> {rr.targets}")
        stage("retrains", t0)
    targets = S.retrain_targets_path(run_dir)
    if targets.is_file():  # the fused model uses the run's targets whenever they are there: say so
        with np.load(targets) as z:
            retrain_info.update(n=int(len(z["masks"])), subset_sizes=z["masks"].sum(1).astype(int).tolist())

    registered = [] if prepare_only else available()
    methods = [m for m in registered if (m in s.methods if s.methods is not None else m not in s.exclude)]
    if "montrage" in methods:  # what the fit decided, from the targets or the run itself (saved with the run)
        from montrage.retrains import fit_run

        fitted = fit_run(run_dir, ["montrage"])["montrage"]
        pm = fitted["prompt"]
        cf, ex = pm.get("counterfactual") or {}, pm.get("exact_caption") or {}
        retrain_info["channel_sets"] = {kind: {k: v for k, v in (m.get("channel_set") or {}).items()
                                               if k in ("chosen", "why")} for kind, m in fitted.items()}
        if retrain_info.get("n"):
            retrain_info.update(counterfactual_adopted=bool(cf.get("adopted")), counterfactual_why=cf.get("why"),
                                lds_by_share=ex.get("lds_by_share"))
        if ex.get("adopted"):
            retrain_info.update(others_share=float(ex.get("others_share", 1.0)), share_why=ex.get("share_why"),
                                memorised=ex.get("memorised"), memorised_share=ex.get("memorised_share"))
    echo(f"[4/6] scoring {len(methods)} methods: {', '.join(methods)}")
    t0 = time.time()
    caches: Dict[str, dict] = {q: {} for q in queries}
    scores: Dict[str, Dict[str, Optional[np.ndarray]]] = {}
    errors: Dict[str, str] = {}
    score_times: Dict[str, Dict[str, float]] = {}
    (out / "scores").mkdir(exist_ok=True)
    qkey = _digest(*[[q.ids, q.prompts] for q in queries.values()], *[q.images for q in queries.values()])
    reused_scores: List[str] = []
    for m in methods:
        scores[m], score_times[m] = {}, {}
        saved = out / "scores" / f"{m}.npz"
        if rescore is not None and m not in rescore and saved.is_file():
            z = np.load(saved)
            if "_queries" in z.files and str(z["_queries"]) == qkey:
                scores[m] = {q: (z[q] if q in z.files else None) for q in queries}
                score_times[m] = {q: float(z["_seconds"][i]) for i, q in enumerate(queries)} if "_seconds" in z.files else {}
                reused_scores.append(m)
                echo(f"    {m:<24} reused saved scores")
                continue
        try:
            for qname, qs in queries.items():
                t1 = time.time()
                cache = caches.setdefault(f"{m}/all", {}) if m == "concept-trak" else caches[qname]
                scores[m][qname] = score_method(m, run_dir, store, qs, cache, s.data.dataset)
                score_times[m][qname] = round(time.time() - t1, 2)
        except Exception as exc:  # one failing method must not sink a long benchmark
            log.exception("scorer %s failed", m)
            errors[m] = f"{type(exc).__name__}: {exc}"
        if m not in errors:
            np.savez_compressed(saved, _queries=np.array(qkey),
                                _seconds=np.array([score_times[m].get(q, np.nan) for q in queries]),
                                **{k: a for k, a in scores[m].items() if a is not None})
        echo(f"    {m:<24} {sum(score_times[m].values()):7.1f} s" + (f"  ERROR {errors[m]}" if m in errors else ""))
    timings["scoring_per_method"] = score_times
    stage("scoring", t0)

    t0 = time.time()
    lds_cfg = s.train_config(s.lds_steps)
    subsets = lds_subsets(len(data.rows), s.lds_subsets, s.lds_fraction, s.lds_seed0 + 100 * s.seed)
    identity = {"dataset": store.train_meta[S.ATTR_DATASET_FINGERPRINT], "data_config": s.data.training_fields()}
    cq = queries["caption"]
    losses = np.zeros((len(subsets), len(cq)))
    masks = np.zeros((len(subsets), len(data.rows)))
    reused = 0
    lds_model = RunModel(store.run_config)
    for j, (sd, idx) in enumerate(subsets):
        lora, was_cached = retrain_subset(out / "lds_cache", sd, idx, data, lds_cfg, identity)
        reused += was_cached
        masks[j, idx] = 1
        c = lds_model.set_weights(load_lora_file(lora), tag=None)
        losses[j] = probe_losses(c, cq.images, cq.prompts, s.lds_timesteps)
        echo(f"    subset {j + 1}/{len(subsets)} (seed {sd}, {len(idx)} images){' cached' if was_cached else ''}")
    np.savez_compressed(out / "lds_losses.npz", losses=losses, masks=masks)
    echo(f"[5/6] LDS: {len(subsets)} retrained subsets ({reused} from cache)")
    stage("lds_retrain_and_losses", t0)
    if prepare_only:
        store.close()
        (out / "prepare.json").write_text(json.dumps({"timings_s": timings}, indent=1))
        return {"prepared": str(out), "timings_s": timings}

    t0 = time.time()
    alphas = np.array([m["alpha"] for m in queries["mixed"].meta])
    per_item: Dict[str, Dict[str, Dict[str, np.ndarray]]] = {}
    entries: Dict[str, dict] = {}
    for m in methods:
        entry: dict = {"score_seconds": score_times.get(m)}
        if m in errors:
            entries[m] = {**entry, "error": errors[m]}
            continue
        sc = scores[m]
        lds = (M.lds_per_query(sc["caption"], masks, losses) if sc.get("caption") is not None and len(subsets) >= 2
               else None)
        per_item[m] = per_query_metrics(sc, queries, train_concepts, lds)
        entry["metrics"] = summarise(per_item[m], alphas, s.n_bootstrap, s.seed)
        entries[m] = entry
    if FOCUS in per_item:
        entries[FOCUS]["diff_vs"] = {}
        for m, vals in per_item.items():
            if m != FOCUS:
                d = differences(per_item[FOCUS], vals, alphas, s.n_bootstrap, s.seed)
                entries[FOCUS]["diff_vs"][m] = d
                entries[m]["diff_from_focus"] = d
    ablation = {f"{a} - {b}": differences(per_item[a], per_item[b], alphas, s.n_bootstrap, s.seed)
                for a, b in DYNAMICS_ABLATION if a in per_item and b in per_item}
    stage("metrics", t0)
    timings["total"] = round(time.time() - t_all, 2)

    results = {
        "benchmark": "attribution", "dataset": s.data.dataset, "seed": s.seed, "quick": bool(quick), "focus": FOCUS,
        "settings": _jsonable(dataclasses.asdict(s)),
        "data": {"n_concepts": len(data.concept_names), "n_train": len(data.rows), "heldout": data.heldout,
                 "checkpoint_steps": store.steps.tolist()},
        "queries": {k: len(v) for k, v in queries.items()},
        "lds": {"subsets": len(subsets), "subset_seeds": [sd for sd, _ in subsets], "fraction": s.lds_fraction,
                "steps": lds_cfg.steps, "timesteps": list(s.lds_timesteps), "noise_seed": LDS_NOISE_SEED,
                "queries": "caption", "sign_convention": SIGN_CONVENTION, "reused_from_cache": int(reused)},
        "retrains": retrain_info,
        "timings_s": timings, "methods": entries, "dynamics_ablation": ablation, "reused_scores": reused_scores,
        "prepare_timings_s": (json.loads((out / "prepare.json").read_text()).get("timings_s")
                              if (out / "prepare.json").is_file() else None),
        "git_commit": _git_commit(),
        "excluded": {m: "concept-level method, scored by `bench concept`" for m in s.exclude if m in available()}
        if s.methods is None else {},
    }
    results = _jsonable(results)
    results["verdicts"] = _jsonable(verdicts(results))
    results["markdown"] = markdown(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(results["markdown"] + "\n")
    store.close()
    echo(f"[6/6] wrote {out / 'results.json'} and {out / 'results.md'} (total {timings['total']:.0f} s)")
    return results


# ----------------------------------------------------------------------------- sample grid
def sample_grid(run_dir: str | Path, data: BenchData, path: str | Path, n_objects: int = 4, seed: int = 0,
                num_steps: int = 25, guidance_scale: float = 1.5) -> Path:
    """PNG: per concept row, training images | base model (checkpoint 0) | fine-tuned (last checkpoint)
    generations of the same captions and seeds."""
    from PIL import Image, ImageDraw

    store = RunStore.open(run_dir)
    concepts, objects, prompts = data.sample_prompts(n_objects)
    seeds = [777_000 + seed * 1000 + i for i in range(len(prompts))]
    model = RunModel(store.run_config)
    base = generate(model.set_weights(store.lora_weights(0), tag=0), prompts, seeds, num_steps, guidance_scale)
    last = store.n_checkpoints - 1
    tuned = generate(model.set_weights(store.lora_weights(last), tag=last), prompts, seeds, num_steps, guidance_scale)
    train_imgs = {r["text"]: np.asarray(Image.open(data.data_dir / r["file_name"]).convert("RGB")) for r in data.rows}
    store.close()
    names = data.concept_names
    res, cell, gap, label_w, head_h = base.shape[1], 48, 8, 190, 22
    width = label_w + 3 * (n_objects * cell) + 2 * gap * 3
    height = head_h + len(names) * (cell + 4)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    blocks = [("training images", lambda i: train_imgs[prompts[i]]), ("base model", lambda i: base[i]),
              ("fine-tuned", lambda i: tuned[i])]
    for b, (title, _) in enumerate(blocks):
        draw.text((label_w + b * (n_objects * cell + 2 * gap), 4), title, fill=(0, 0, 0))
    for r, c in enumerate(names):
        y = head_h + r * (cell + 4)
        draw.text((4, y + cell // 2 - 6), c, fill=(0, 0, 0))
        idx = [i for i, cc in enumerate(concepts) if cc == c]
        for b, (_, get) in enumerate(blocks):
            for j, i in enumerate(idx[:n_objects]):
                x = label_w + b * (n_objects * cell + 2 * gap) + j * cell
                canvas.paste(Image.fromarray(get(i)).resize((cell - 2, cell - 2), Image.NEAREST), (x, y))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def _git_commit() -> str:
    from benchmarks.cli import git_commit

    return git_commit()


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x


# ----------------------------------------------------------------------------- command line and BENCHMARKS.md
def _setup_lines(res: dict) -> List[str]:
    s, d, t = res["settings"], res["data"], res["timings_s"]
    dc = s["data"]
    if res["dataset"] == "typefaces":
        what = (f"{d['n_concepts']} typefaces (concept) x {dc['per_concept']} characters (object) of matplotlib's "
                f"fonts, one (face, character) pair per face held out: {d['n_train']} training glyphs")
    else:
        what = (f"{d['n_concepts']} made-up artists (hard pairs: same palette and background, different stroke) x "
                f"{dc['per_concept']} images, one object per artist held out: {d['n_train']} training images")
    return [
        f"- setup: {what}; held out {', '.join(f'{c}/{o}' for c, o in d['heldout'])}; one monitored LoRA run of "
        f"{s['steps']} steps (lr {s['lr']}, rank {s['rank']}, batch {s['batch_size']}), checkpoints at steps "
        f"{d['checkpoint_steps']}; queries {res['queries']}",
        f"- LDS: {res['lds']['subsets']} retrained random halves ({res['lds']['steps']} steps each, no monitor), "
        f"losses of the caption queries at timesteps {res['lds']['timesteps']}; {SIGN_CONVENTION}",
        (f"- `montrage` fitted with counterfactual targets (`montrage fit --retrains {res['retrains']['n']}`): "
         f"{res['retrains']['n']} more retrained subsets, drawn apart from the LDS subsets above, and the losses of "
         "the run's own generations of its anchors' captions under them (no benchmark query)"
         if (res.get("retrains") or {}).get("n") else
         "- `montrage` fitted without counterfactual targets (no `--retrains`)") + _fit_decisions(res.get("retrains") or {}),
        f"- timings (s): data {t.get('data')}, monitored training {t.get('train_monitored')}, queries "
        f"{t.get('queries')}, scoring {t.get('scoring')}, LDS retraining + losses {t.get('lds_retrain_and_losses')}, "
        f"metrics {t.get('metrics')}, total {t.get('total')} (cached stages count their reuse only)"
        + (f"; the cached stages when built (`--prepare`): monitored training {res['prepare_timings_s'].get('train_monitored')}, "
           f"query generation {res['prepare_timings_s'].get('queries')}, LDS retraining + losses "
           f"{res['prepare_timings_s'].get('lds_retrain_and_losses')}" if res.get("prepare_timings_s") else "")
        + (f"; scores reused from an earlier scoring of the same queries: {', '.join(res['reused_scores'])}"
           if res.get("reused_scores") else ""),
    ]


def _channel_sets(info: dict) -> str:
    """The channel set the fit chose per query kind (every channel, or the final checkpoint's), and why."""
    sets = {k: v for k, v in (info.get("channel_sets") or {}).items() if v.get("chosen")}
    names = {"final": "the final checkpoint's channels", "all": "every channel"}
    return "".join(f"; {kind} queries: {names.get(v['chosen'], v['chosen'])} ({v.get('why')})"
                   for kind, v in sets.items())


def _fit_decisions(info: dict) -> str:
    """What the fit decided (channel sets; from the counterfactual targets or the run itself, the exact-caption
    share), for the section's set-up line."""
    if "others_share" not in info:
        return _channel_sets(info)
    out = _channel_sets(info) + (f"; the fit {'adopted' if info.get('counterfactual_adopted') else 'did not adopt'} the counterfactual "
           f"term ({info.get('counterfactual_why')})" if info.get("n") else "")
    out += f"; the other images' share on an exact-caption query: {info['others_share']:g} ({info.get('share_why')})"
    if info.get("lds_by_share"):
        out += "; LDS on the targets by share: " + ", ".join(f"{k}: {v:.3f}" for k, v in info["lds_by_share"].items())
    if info.get("n") and info.get("memorised"):  # what the run alone would have chosen, beside the retrains' choice
        k, n = info["memorised"]
        out += (f"; without retrains the memorisation test would choose {info.get('memorised_share'):g} ({k} of {n} "
                "generations of training captions reproduce their image)")
    return out


def _fit_label(info: dict) -> str:
    """How the focus model was fitted, for the summary: the default fit, or with N retrains and the share they chose."""
    share = (f", the other images' share on an exact-caption query {info['others_share']:g}"
             if "others_share" in info else "")
    sets = {k: v.get("chosen") for k, v in (info.get("channel_sets") or {}).items() if v.get("chosen")}
    chans = ("; channels " + ", ".join(f"{k}: {'final checkpoint' if c == 'final' else 'all'}" for k, c in sets.items())
             if sets else "")
    if not info.get("n"):
        return "the default fit (no retrains)" + (share + " (memorisation test)" if share else "") + chans
    return f"`montrage fit --retrains {info['n']}`{share}{chans}"


def summary_markdown(results: Sequence[dict]) -> str:
    """The headline: the verdict rows of every (dataset, seed) side by side."""
    if not results:
        return ""
    keys = [(q, k, lbl, tgt) for q, k, lbl, tgt in HEADLINE]
    cols = [f"{r['dataset']} seed {r['seed']}" for r in results]
    out = [f"Per headline metric: `{FOCUS}` value [95% CI]; then `ok` = best or tied-best (every paired difference "
           f"to another method has an interval reaching 0 and a point estimate >= -{TIE_TOLERANCE}), else the method "
           "it loses to and by how much; `T` = target met, else the gap.", "",
           "| metric | target | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for q, k, lbl, tgt in keys:
        cells = []
        for r in results:
            row = next((v for v in r.get("verdicts", []) if v["query_type"] == q and v["metric"] == k), None)
            if row is None:
                cells.append("n/a")
                continue
            c = f"{row['value']:.2f} [{row['ci'][0]:.2f}, {row['ci'][1]:.2f}]"
            c += "; ok" if row["best_or_tied"] else f"; loses to {row['worst_diff'][0]} by {-row['worst_diff'][1]['diff']:.2f}"
            if row["target_met"] is not None:
                c += "; T" if row["target_met"] else f"; gap {row['target_gap']:+.2f}"
                if row.get("lds_beats") and not all(row["lds_beats"].values()):
                    c += " (not above " + ", ".join(m for m, v in row["lds_beats"].items() if not v) + ")"
            cells.append(c)
        out.append(f"| {lbl} | {'-' if tgt is None else f'>= {tgt:.2f}'} | " + " | ".join(cells) + " |")
    fitted = [f"{c}: {_fit_label(r.get('retrains') or {})}" for c, r in zip(cols, results)]
    out += ["", f"`{FOCUS}` fitted with: " + "; ".join(fitted) + " (see each section's set-up)."]
    text_rows = []
    for r in results:
        tm = r["methods"].get(TEXT_BASELINE, {}).get("metrics", {})
        vals = [f"{lbl}: {tm[q][k]['value']:.2f}" for q, k, lbl, _ in keys
                if tm.get(q, {}).get(k, {}).get("value") is not None]
        if vals:
            text_rows.append(f"- `{TEXT_BASELINE}` on {r['dataset']} seed {r['seed']}: " + "; ".join(vals))
    if text_rows:
        out += ["", "What prompt-vs-caption text matching alone reaches (no pixels; constant scores, i.e. chance, "
                "without a prompt):", "", *text_rows]
    beyond = []
    for r in results:  # the prompt-known query types: what the focus adds over text matching, paired
        d = r["methods"].get(TEXT_BASELINE, {}).get("diff_from_focus", {})
        cells = [f"{lbl}: {d[q][k]['diff']:+.2f} [{d[q][k]['ci'][0]:+.2f}, {d[q][k]['ci'][1]:+.2f}]"
                 for q, k, lbl, _ in keys if q in ("caption", "composition")
                 and d.get(q, {}).get(k, {}).get("diff") is not None]
        if cells:
            beyond.append(f"- {r['dataset']} seed {r['seed']}: " + "; ".join(cells))
    if beyond:
        out += ["", f"`{FOCUS}` - `{TEXT_BASELINE}` on the prompt-known query types (paired difference [95% CI]; "
                f"`{FOCUS}` reads the prompt through the run's own text encoder among its inputs (never word "
                "matching), so this is what everything else it reads adds, or costs, beyond text):", "", *beyond]
    notes = Path(__file__).with_name("attribution_notes.md")
    if notes.is_file():
        out += ["", notes.read_text().strip()]
    return "\n".join(out)


def collect_results(out: Path, quick: bool) -> List[dict]:
    """results.json of every (dataset, seed) run under ``out`` with the same quick flag, sorted."""
    found, seen = [], set()
    for p in sorted(Path(out).glob("attribution-*-seed*/results.json")):
        if p.resolve() in seen:  # a folder linked under a second name is one run
            continue
        seen.add(p.resolve())
        try:
            r = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (r.get("benchmark") == "attribution" and bool(r.get("quick")) == bool(quick) and "dataset" in r
                and not _is_variant(r)):
            found.append(r)
    return sorted(found, key=lambda r: (r["dataset"], r["seed"]))


def _is_variant(res: dict) -> bool:
    """A result of non-default settings (``--train-steps`` etc.): reported in its own section, never summarised."""
    s = res.get("settings") or {}
    base = _default_settings(res["dataset"], int(res.get("seed", 0)), bool(res.get("quick")))
    return any(k in s and s[k] != getattr(base, k) for k in VARIANT_KEYS)


def run_from_cli(args) -> int:
    """``montrage bench attribution [--dataset D] [--seed N] [--quick] [--out DIR] [--write-md [PATH]]``."""
    from benchmarks.cli import provenance_lines, write_md_section

    dataset, seed, quick = getattr(args, "dataset", "synthetic") or "synthetic", int(getattr(args, "seed", 0) or 0), \
        bool(args.quick)
    s = settings_for(dataset, seed, quick, {"steps": getattr(args, "train_steps", None),
                                            "rank": getattr(args, "rank", None), "lr": getattr(args, "lr", None),
                                            "lds_subsets": getattr(args, "lds_subsets", None)})
    tag = variant_tag(s, dataset, seed, quick)
    out = run_dir_for(args.out, dataset, seed, quick, tag)
    rescore = getattr(args, "rescore", None)
    if getattr(args, "from_results", False):  # report a finished run again (e.g. --write-md later), no work
        res = json.loads((out / "results.json").read_text())
        if res.get("prepare_timings_s") is None and (out / "prepare.json").is_file():
            res["prepare_timings_s"] = json.loads((out / "prepare.json").read_text()).get("timings_s")
    else:
        res = run_attribution_bench(out, quick=quick, settings=s, dataset=dataset, seed=seed,
                                    prepare_only=bool(getattr(args, "prepare", False)),
                                    rescore=None if rescore is None else [m for m in rescore.split(",") if m],
                                    retrains=int(getattr(args, "retrains", 0) or 0))
    if "prepared" in res:
        print(f"prepared {res['prepared']} (run, queries, LDS retrains); timings {res['timings_s']}")
        return 0
    print()
    print(res["markdown"])
    if not args.write_md:
        return 0
    md_path = Path(args.write_md)
    suffix = "-quick" if quick else ""
    grid_rel = f"docs/attribution_samples_{dataset}_seed{seed}{suffix}{tag}.png"
    grid = sample_grid(out / "run", build_bench_data(out / "data", s.data), md_path.parent / grid_rel, seed=seed,
                       num_steps=s.probe_steps, guidance_scale=s.guidance_scale)
    print(f"wrote {grid}")
    seeds = (f"--seed {seed}: data, training, queries, LDS subsets {res['lds']['subset_seeds']}, bootstrap "
             f"({res['settings']['n_bootstrap']} resamples); LDS noise {res['lds']['noise_seed']}")
    kind = f"attribution-{dataset}-seed{seed}{suffix}{tag}"
    scored = (f"- scored at git commit `{res['git_commit']}` (plus the working tree of that time)" if res.get("git_commit")
              else "- scored before this section was written (see the timings); git commit of the writing below")
    title = f"### Attribution, {dataset}, seed {seed}" + (" (--quick)" if quick else "")
    if tag:
        title += (f" -- variant: LoRA {s.steps} steps, rank {s.rank}, lr {s.lr:g}, {s.lds_subsets} LDS subsets "
                  "(not in the summary above)")
    body = "\n".join([title, "",
                      provenance_lines(args, seeds), scored, *_setup_lines(res),
                      f"- samples (training images | base model | fine-tuned, same captions and seeds): "
                      f"[{grid_rel}]({grid_rel})", "", res["markdown"]])
    print(f"wrote section '{kind}' of {write_md_section(kind, body, md_path)}")
    if tag:
        return 0
    summary = summary_markdown(collect_results(Path(args.out), quick))
    head = ["## Attribution on the queries users bring" + (" (--quick)" if quick else ""), "",
            "Every registered method on every query type (prompt = a training caption; a new composition; image "
            "only: the generation without its prompt, a perturbed copy of a training image, an unseen image in a "
            "concept's style; blended prompts) and LDS, on the synthetic artists and on real typefaces, at seeds "
            "0, 1 and 2 (`montrage bench attribution --dataset D --seed N --write-md`); the full tables per (dataset, "
            "seed) follow this summary.", "", ""]
    print(f"wrote section 'attribution{suffix}' of {write_md_section('attribution' + suffix, chr(10).join(head) + summary, md_path)}")
    return 0

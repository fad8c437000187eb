"""The fused model and its fit: non-negative channel weights and a calibration fitted with the attribution loss,
and the held-out choice of the channel set. Arrays in, a :class:`FusedModel` out: no run, store or model here."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from montrage.analysis.fused.kinds import IMAGE, TRAJECTORY_FAMILIES, family, feature
from montrage.errors import ScorerError

FIT_STEPS = 400
WEIGHT_DECAY = 1e-3
RANK_TEMPERATURE = 0.1  # of the image-level listwise term, in z-score units of the combined score
CONCEPT_TEMPERATURE = 0.2  # of the concept-level term
CONCEPT_WEIGHT = 3.0
EXEMPLAR_OUT_FILL = -1e6  # a left-out image's raw score in the exemplar-out concept term: below every concept's top 3
COUNTERFACTUAL_WEIGHT = 1.0  # of the LDS-style term, when the run has retrained subsets (`montrage fit --retrains`)

# The channel set is chosen per run and query kind on held-out anchors: every channel, or the attributed
# checkpoint's only (what montrage-final uses), whichever has the lower held-out value of the fit's own objective
# over CHANNEL_SET_REPEATS random CHANNEL_SET_FOLDS-fold splits of the anchors (scored on the held-out anchors'
# rows of the last supervision set: the run's generations of their captions when there are any). More channels
# are more weights to fit on a few dozen anchors: on the four benchmark runs of model version 12 the trajectory
# channels lowered the in-sample loss but raised the held-out one.
CHANNEL_SET_FOLDS = 4
CHANNEL_SET_LABELS = {"final": "the final checkpoint's channels only", "all": "every channel"}  # for fit and report
CHANNEL_SET_REPEATS = 2


@dataclass
class Counterfactual:
    """Denoising losses of supervision rows under LoRAs retrained on subsets of the training set: what removing
    training images actually did, the target D-TRAK's LDS scores attribution against."""
    rows: np.ndarray  # (R,) indices of the supervised rows (the run's generations of the anchors' captions)
    masks: np.ndarray  # (M, N): 1 where training image i was in retrained subset m
    losses: np.ndarray  # (M, R)

    def take(self, subsets: Sequence[int]) -> "Counterfactual":
        return Counterfactual(self.rows, self.masks[list(subsets)], self.losses[list(subsets)])


@dataclass
class FusedModel:
    kind: str
    channels: List[str]
    weights: np.ndarray
    scale: float = 1.0
    bias: float = 0.0
    supervision: str = ""
    history: List[float] = field(default_factory=list)
    counterfactual: Dict[str, object] = field(default_factory=dict)  # retrains used, and held-out LDS
    exact_caption: Dict[str, object] = field(default_factory=dict)  # the exact-caption rule: adopted, and why
    channel_set: Dict[str, object] = field(default_factory=dict)  # every channel or the final checkpoint's, and why

    @property
    def final_only(self) -> bool:
        """Whether the held-out choice kept the attributed checkpoint's channels only (queries then compute no
        trajectory channel)."""
        return self.channel_set.get("chosen") == "final"

    @property
    def exact_caption_first(self) -> bool:
        return bool(self.exact_caption.get("adopted"))

    @property
    def others_share(self) -> float:
        """On an exact-caption query, the factor on the other images' scores (1 unless the counterfactual targets
        chose less: see :func:`exact_caption_share`)."""
        return float(self.exact_caption.get("others_share", 1.0)) if self.exact_caption_first else 1.0

    def raw(self, values: Dict[str, np.ndarray]) -> np.ndarray:
        missing = [c for c in self.channels if c not in values]
        if missing:
            raise ScorerError(f"montrage: channels {missing} were fitted but are not available for these queries")
        return sum(np.float32(w) * feature(c, values[c]) for c, w in zip(self.channels, self.weights))

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        return (1.0 / (1.0 + np.exp(-self.scale * (raw - self.bias)))).astype(np.float32)

    def used(self) -> Dict[str, float]:
        return {c: round(float(w), 6) for c, w in zip(self.channels, self.weights)}

    def to_json(self) -> dict:
        return {"kind": self.kind, "channels": self.channels, "weights": [float(w) for w in self.weights],
                "scale": self.scale, "bias": self.bias, "supervision": self.supervision,
                "counterfactual": self.counterfactual, "exact_caption": self.exact_caption,
                "channel_set": self.channel_set}

    @classmethod
    def from_json(cls, d: dict) -> "FusedModel":
        return cls(d["kind"], list(d["channels"]), np.asarray(d["weights"], np.float64), float(d["scale"]),
                   float(d["bias"]), d.get("supervision", ""), counterfactual=dict(d.get("counterfactual") or {}),
                   exact_caption=dict(d.get("exact_caption") or {}), channel_set=dict(d.get("channel_set") or {}))


def concept_membership(concepts: Optional[Sequence[str]], target: np.ndarray):
    """(members (L, N) bool, own (A,) index into members' rows or -1) for the concept term, or (None, None) with fewer
    than two concepts: a supervision row's own concept is that of its target-1 image."""
    import torch

    labels = sorted(set(concepts or []) - {""})
    if len(labels) < 2:
        return None, None
    members = torch.tensor(np.array([[c == lab for c in concepts] for lab in labels]))
    own = torch.tensor([labels.index(concepts[int(j)]) if row.max() >= 1.0 and concepts[int(j)] else -1
                        for row, j in zip(target, target.argmax(1))])
    return members, own


def objective(raw, cal, y, members, own, exemplar_out: bool = False):
    """The fit's objective without its regularisers: the attribution loss, plus the between-concept ranking term
    when there are concepts (on the raw combination: tried on the calibrated score (v7), it drove the sigmoid's scale
    to 10-40, so top scores saturated at 1.0 in float32 and tied). With ``exemplar_out`` (image-only kind), the
    concept term once more with each row's own image left out of the ranking: an image-only query may show a
    concept on something no training image shows (an artist's new work), so its concept must come first from the
    concept's other images too -- without it the fit weighs only what finds the exemplar (v15)."""
    from montrage.losses.attribution import attribution_loss, concept_ranking_loss

    loss = attribution_loss(raw, cal, y, temperature=RANK_TEMPERATURE)
    if members is not None:
        loss = loss + CONCEPT_WEIGHT * concept_ranking_loss(raw, members, own, temperature=CONCEPT_TEMPERATURE)
        if exemplar_out:
            without = raw.masked_fill(y >= 1.0, float(EXEMPLAR_OUT_FILL))
            loss = loss + CONCEPT_WEIGHT * concept_ranking_loss(without, members, own,
                                                                temperature=CONCEPT_TEMPERATURE)
    return loss


def fit(values: Dict[str, np.ndarray], target: np.ndarray, kind: str, supervision: str,
        concepts: Optional[Sequence[str]] = None, steps: int = FIT_STEPS, lr: float = 0.05,
        counterfactual: Optional[Counterfactual] = None) -> FusedModel:
    """Non-negative channel weights + calibration minimising the attribution loss on (A, N) supervision, plus
    (with training-image ``concepts``) the between-concept ranking term: each supervision query's own concept
    (that of its target-1 image) should have the best concept score; plus (with ``counterfactual``, 2+ retrained
    subsets) the LDS-style term on the calibrated scores of its rows."""
    return fit_many([(values, target)], kind, supervision, concepts, steps, lr, counterfactual)[0]


def fit_many(problems: Sequence[Tuple[Dict[str, np.ndarray], np.ndarray]], kind: str, supervision: str,
             concepts: Optional[Sequence[str]] = None, steps: int = FIT_STEPS, lr: float = 0.05,
             counterfactual: Optional[Counterfactual] = None) -> List[FusedModel]:
    """:func:`fit` of several (values, target) problems with the same channels and shapes, in one optimisation:
    each problem has its own parameters, the objective is the sum of the problems' objectives and Adam's update is
    per element, so every model is the one :func:`fit` gives alone; only each step's overhead is shared (the
    held-out choice of the channel set fits 16 models on a few dozen anchors)."""
    import torch

    from montrage.losses.attribution import counterfactual_loss

    names = sorted(problems[0][0])
    shape = problems[0][1].shape
    if any(sorted(v) != names or t.shape != shape for v, t in problems):
        raise ScorerError("fit_many: every problem must have the same channels and supervision shape")
    feats = torch.from_numpy(np.stack([np.stack([feature(c, v[c]) for c in names]) for v, _ in problems])
                             ).double()  # (B, C, A, N)
    y = torch.from_numpy(np.stack([t for _, t in problems])).double()  # (B, A, N)
    members, own = None, None
    memberships = [concept_membership(concepts, t) for _, t in problems]
    if memberships[0][0] is not None:
        members, own = memberships[0][0], torch.stack([o for _, o in memberships])  # (L, N), (B, A)
    use_cf = counterfactual is not None and len(counterfactual.masks) >= 2
    if use_cf:
        cf_rows = torch.from_numpy(np.asarray(counterfactual.rows, np.int64))
        cf_masks = torch.from_numpy(np.asarray(counterfactual.masks, np.float64))
        cf_losses = torch.from_numpy(np.asarray(counterfactual.losses, np.float64))
    n = len(problems)
    theta = torch.zeros(n, len(names), dtype=torch.float64, requires_grad=True)
    log_scale = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    bias = torch.full((n,), 2.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([theta, log_scale, bias], lr=lr)
    history: List[List[float]] = [[] for _ in problems]
    for _ in range(steps):
        w = torch.nn.functional.softplus(theta)
        raw = torch.einsum("bc,bcan->ban", w, feats)
        cal = torch.sigmoid(log_scale.exp()[:, None, None] * (raw - bias[:, None, None]))
        loss = objective(raw, cal, y, members, own, kind == IMAGE) + WEIGHT_DECAY * (w ** 2).sum(-1)  # (B,)
        if use_cf:
            loss = loss + COUNTERFACTUAL_WEIGHT * torch.stack([counterfactual_loss(c[cf_rows], cf_masks, cf_losses)
                                                               for c in cal])
        opt.zero_grad()
        loss.sum().backward()
        opt.step()
        for h, value in zip(history, loss.detach().tolist()):
            h.append(value)
    w = torch.nn.functional.softplus(theta).detach().numpy()
    scale, b0 = log_scale.detach().exp().numpy(), bias.detach().numpy()
    return [FusedModel(kind, names, w[i], float(scale[i]), float(b0[i]), supervision, history[i]) for i in range(n)]


def final_channels(names: Sequence[str], k: int) -> List[str]:
    """Of ``names``, the channels ``montrage-final`` computes at checkpoint index ``k``: no trajectory family, the
    representation similarity at k only, the TracIn term at k only."""
    def at_k(c: str) -> bool:
        if family(c) in TRAJECTORY_FAMILIES:
            return False
        if c.startswith("rep/"):
            return c.endswith("/sim-final")
        return not c.startswith("grad/tracin/k") or c == f"grad/tracin/k{k}"

    return [c for c in names if at_k(c)]


def heldout_objective(values: Dict[str, np.ndarray], target: np.ndarray, kind: str, concepts: Sequence[str],
                      n_anchors: int, seeds: Sequence[int], folds: int = CHANNEL_SET_FOLDS) -> np.ndarray:
    """(len(seeds) x folds,) the fit's objective on held-out anchors, per seed in order: the anchors split at random
    (``seed``) into ``folds``; fitted on every supervision row of the other anchors, scored on the held-out anchors'
    rows of the last supervision set. Rows are stacked per set, ``n_anchors`` per set. Folds of the same size are
    fitted together (:func:`fit_many`)."""
    import torch

    n_sets = len(target) // n_anchors
    splits = []  # (held-out anchors, training rows)
    for seed in seeds:
        perm = np.random.default_rng(seed).permutation(n_anchors)
        for f in range(folds):
            held = np.sort(perm[f::folds])
            kept = np.setdiff1d(np.arange(n_anchors), held)
            splits.append((held, np.concatenate([kept + s * n_anchors for s in range(n_sets)])))
    by_size: Dict[int, List[int]] = {}
    for i, (_, rows) in enumerate(splits):
        by_size.setdefault(len(rows), []).append(i)
    out = np.empty(len(splits))
    for same in by_size.values():
        models = fit_many([({c: v[splits[i][1]] for c, v in values.items()}, target[splits[i][1]]) for i in same],
                          kind, "", concepts)
        for i, model in zip(same, models):
            test = splits[i][0] + (n_sets - 1) * n_anchors
            raw = model.raw({c: v[test] for c, v in values.items()})
            y = target[test]
            members, own = concept_membership(concepts, y)
            with torch.no_grad():
                out[i] = float(objective(torch.from_numpy(raw).double(),
                                         torch.from_numpy(model.calibrate(raw)).double(),
                                         torch.from_numpy(y).double(), members, own, kind == IMAGE))
    return out


def choose_channel_set(values: Dict[str, np.ndarray], target: np.ndarray, kind: str, concepts: Sequence[str],
                       n_anchors: int, k: int) -> Dict[str, object]:
    """Every channel, or the attributed checkpoint's only: whichever fits held-out anchors better (the lower mean of
    the fit's objective over the same CHANNEL_SET_REPEATS x CHANNEL_SET_FOLDS splits), recorded with the figures. With
    too few anchors to hold any out, every channel is kept."""
    names = sorted(values)
    final = final_channels(names, k)
    if not final or len(final) == len(names):
        return {"chosen": "all", "why": "no separate final-checkpoint channel set"}
    if n_anchors < 2 * CHANNEL_SET_FOLDS:
        return {"chosen": "all", "why": f"not measured ({n_anchors} anchors; needs {2 * CHANNEL_SET_FOLDS}+)"}
    if len(target) % n_anchors:
        return {"chosen": "all", "why": f"not measured ({len(target)} supervision rows are not sets of {n_anchors})"}
    loss = {name: heldout_objective({c: values[c] for c in chans}, target, kind, concepts, n_anchors,
                                    range(CHANNEL_SET_REPEATS))
            for name, chans in (("all", names), ("final", final))}
    diff = loss["final"] - loss["all"]
    se = float(diff.std(ddof=1) / np.sqrt(len(diff)))
    chosen = "final" if diff.mean() < 0 else "all"
    a, f = float(loss["all"].mean()), float(loss["final"].mean())
    return {"chosen": chosen, "heldout_all": round(a, 4), "heldout_final": round(f, 4), "difference_se": round(se, 4),
            "channels_final": final,
            "why": (f"held-out objective {f:.3f} with the final checkpoint's channels, {a:.3f} with every channel "
                    f"(difference s.e. {se:.3f}; {CHANNEL_SET_REPEATS} x {CHANNEL_SET_FOLDS}-fold over the anchors)")}

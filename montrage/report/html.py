"""``montrage report``: one self-contained static HTML page about a run and its attribution.

The page opens from disk with no server and no network: every image and figure is embedded as a
base64 PNG data URI, the CSS and the one tiny script are inline, and a Content-Security-Policy meta
tag forbids any other resource. Sections:

1. run summary: data folder, concepts, checkpoints, base model, LoRA and capture configuration,
   wall time and the estimated cost of capture, package versions;
2. attribution of each probe (at most ``max_probes``, grouped by kind): the generation beside its
   top-k training images with scores and concepts, and a bar chart of its concept scores;
3. training dynamics of a few probes: similarity and loss trajectories of the probe and its top
   training images over checkpoints, read from the store;
4. learning curves per concept (``montrage compare``);
5. a grid of probe generations at every checkpoint.

The inline script records on ``<body>`` whether every image decoded (``data-images-ok``,
``data-broken-images``, ``data-image-count``), which the headless-browser test reads back.
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import logging
import os
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from montrage.analysis.attribute import AttributionResult, attribute, between_concept_accuracy
from montrage.analysis.fused import CHANNEL_SET_LABELS
from montrage.errors import DataError, MontrageError, ScorerError
from montrage.report import plots as P
from montrage.storage import RunStore
from montrage.storage import schema as S
from montrage.storage.inspect import summary

log = logging.getLogger(__name__)

MAX_PROBES = 40
DYNAMICS_PROBES = 4
DYNAMICS_TOP = 3
GRID_COLUMNS = 16
_FULL_DYNAMICS_LIMIT = 20_000_000  # channel-tensor elements above which concept-mean lines are skipped

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;background:#f6f7f9;color:#1d232a;font-size:14px}
main{max-width:1240px;margin:0 auto;padding:12px 20px 40px}
h1{font-size:22px;margin:10px 0 2px}h2{font-size:18px;margin:26px 0 8px;border-bottom:2px solid #d9dde3;padding-bottom:4px}
h3{font-size:15px;margin:16px 0 6px}
.sub{color:#5b6570;font-size:12px;margin:0 0 8px}
.note{background:#fff7e0;border-left:4px solid #f0b400;padding:6px 10px;margin:8px 0;font-size:13px}
table.kv{border-collapse:collapse;background:#fff;font-size:13px}
table.kv th{text-align:left;vertical-align:top;padding:3px 12px 3px 8px;color:#44505c;font-weight:600;white-space:nowrap}
table.kv td{padding:3px 8px;vertical-align:top}
table.kv tr:nth-child(odd){background:#fafbfc}
table.data{border-collapse:collapse;background:#fff;font-size:12px;margin:4px 0}
table.data th,table.data td{border:1px solid #e1e4e8;padding:2px 8px;text-align:right}
table.data th{background:#f0f2f5}
.row{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.tag{display:inline-block;padding:0 6px;border-radius:8px;color:#fff;font-size:11px;line-height:17px;white-space:nowrap}
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px 10px;margin:8px 0;display:flex;gap:14px;align-items:flex-start}
.card .query{flex:0 0 auto;width:150px;font-size:12px}
.card .query img{border:2px solid #333}
.card .tops{display:flex;flex-wrap:wrap;gap:6px;flex:1 1 auto}
.card .bars{flex:0 0 auto}
figure{margin:0;text-align:center;font-size:11px}
figure.train{width:104px}
figure.train figcaption{overflow-wrap:anywhere;line-height:1.25}
figure img{display:block;margin:0 auto}
img.fig{max-width:100%;height:auto}
img.px{image-rendering:pixelated;image-rendering:crisp-edges}
.missing{width:96px;height:96px;display:flex;align-items:center;justify-content:center;background:#eceff3;color:#6b7682;font-size:10px;text-align:center;overflow-wrap:anywhere}
.ok{color:#1a7f37;font-weight:600}.bad{color:#c62828;font-weight:600}.exact{color:#6a1b9a;font-weight:600}
.prompt{font-weight:600;font-size:13px;margin-bottom:2px;overflow-wrap:anywhere}
table.grid{border-collapse:collapse;background:#fff}
table.grid th{font-size:10px;font-weight:500;padding:2px;width:66px;vertical-align:bottom;overflow-wrap:anywhere}
table.grid th.step{font-size:12px;font-weight:600;white-space:nowrap;padding-right:8px;text-align:right;width:auto;vertical-align:middle}
table.grid td{padding:1px}
.dyn{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:6px 10px;margin:8px 0;display:flex;gap:12px;align-items:center}
nav a{margin-right:12px;color:#0b5cad;text-decoration:none;font-size:13px}
"""

_SCRIPT = """
window.addEventListener("load", function () {
  var imgs = document.images, broken = 0;
  for (var i = 0; i < imgs.length; i++) {
    if (!imgs[i].complete || imgs[i].naturalWidth === 0) { broken++; }
  }
  document.body.dataset.imageCount = String(imgs.length);
  document.body.dataset.brokenImages = String(broken);
  document.body.dataset.imagesOk = broken === 0 ? "true" : "false";
});
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"


def e(x: object) -> str:
    """Escape any value for HTML text or a quoted attribute."""
    return html.escape("" if x is None else str(x), quote=True)


# ---------------------------------------------------------------------------------------------- inputs
def _load_training_images(store: RunStore, indices: Sequence[int]) -> Tuple[Optional[Dict[int, np.ndarray]], str]:
    """The training images at ``indices`` (those the page shows), read from the run (or its verified source
    paths); (None, note) if unavailable."""
    from montrage.analysis.gradients import training_images

    idx = sorted({int(i) for i in indices})
    try:
        if store.images_stored:
            return dict(zip(idx, store.train_images(idx) if idx else [])), ""
        ts = training_images(store)  # paths + hashes only: re-read and verified
    except (DataError, MontrageError, OSError) as exc:
        log.warning("report: training images unavailable (%s); showing file names only", exc)
        return None, f"training images could not be read ({exc}); they are shown by file name only"
    return {i: ts.images[i] for i in idx}, ""


def _fresh(path: Path, store: RunStore) -> bool:
    """A cached result file written after the store's last commit."""
    try:
        return path.stat().st_mtime >= (RunStore.store_path(store.run_dir) / "zarr.json").stat().st_mtime
    except OSError:
        return False


def _reusable_payload(payload: dict, store: RunStore, method: str, top_k: int) -> bool:
    pm = store.probe_meta
    n_probes = len(pm[S.ATTR_PROMPTS])
    queries = payload.get("queries") or []
    n_train = len(store.train_meta[S.ATTR_FILE_NAMES])
    return (payload.get("method") == method and payload.get("checkpoint") == int(store.steps[-1])
            and payload.get("condition") == "null" and not payload.get("concept")
            and [q.get("id") for q in queries] == [f"probe-{i}" for i in range(n_probes)]
            and [q.get("prompt") for q in queries] == list(pm[S.ATTR_PROMPTS])
            and all(len(q.get("top", [])) >= min(top_k, n_train) for q in queries))


def _cached_json(path: Path, store: RunStore, reuse: bool, accept: Callable[[dict], bool]) -> Optional[dict]:
    """A result file written after the store's last checkpoint that ``accept`` matches to this run, else None."""
    if not (reuse and path.is_file() and _fresh(path, store)):
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        log.warning("report: ignoring unreadable %s: %s", path, exc)
        return None
    if not accept(data):
        return None
    log.info("report: reusing %s", path)
    return data


def _attribution(store: RunStore, method: str, top_k: int, attribution, reuse: bool,
                 progress: bool, options: Optional[dict] = None) -> Tuple[dict, str]:
    """The final-checkpoint probe attribution payload, and where it came from."""
    if attribution is not None:
        payload = attribution.payload if isinstance(attribution, AttributionResult) else dict(attribution)
        return payload, "passed in by the caller"
    step = int(store.steps[-1])
    cached = Path(store.run_dir) / f"attribution_{method}_{step}.json"
    payload = _cached_json(cached, store, reuse, lambda p: _reusable_payload(p, store, method, top_k))
    if payload is not None:
        return payload, f"read from {cached.name}"
    log.info("report: attributing probes with %s at step %d", method, step)
    res = attribute(store.run_dir, method, top_k=max(top_k, 1), write_store=False, progress=progress, store=store,
                    options=options)
    return res.payload, "computed for this report"


def _compare(store: RunStore, method: str, compare_result: Optional[dict], reuse: bool,
             progress: bool, options: Optional[dict] = None) -> Tuple[Optional[dict], str]:
    if compare_result is not None:
        return compare_result, "passed in by the caller"
    steps = [int(s) for s in store.steps]
    cached = Path(store.run_dir) / f"compare_{method}.json"
    res = _cached_json(cached, store, reuse, lambda r: bool(
        r.get("method") == method and r.get("to") == steps[-1] and r.get("curves")
        and set(r.get("steps", [])) <= set(steps)))
    if res is not None:
        return res, f"read from {cached.name}"
    from montrage.analysis.compare import compare

    log.info("report: comparing %s across %d checkpoints", method, len(steps))
    try:
        return compare(store.run_dir, method, progress=progress, options=options), "computed for this report"
    except (ScorerError, MontrageError) as exc:
        log.warning("report: learning curves unavailable: %s", exc)
        return None, f"learning curves unavailable: {exc}"


# ---------------------------------------------------------------------------------------------- pieces
def _tag(concept: str, colors: Dict[str, str]) -> str:
    if not concept:
        return '<span class="tag" style="background:#9e9e9e">none</span>'
    return f'<span class="tag" style="background:{e(P.color_of(colors, concept))}">{e(concept)}</span>'


def _img(uri: str, alt: str, size: Optional[int] = None, cls: str = "px") -> str:
    """An <img>; ``size`` (square thumbnails) fixes its box, figures (``size`` None) keep their own."""
    dims = "" if size is None else f' width="{size}" height="{size}"'
    return f'<img class="{cls}" src="{e(uri)}" alt="{e(alt)}" title="{e(alt)}"{dims}>'


def _kv(rows: Sequence[Tuple[str, str]]) -> str:
    """A two-column table; values are HTML already escaped by the caller."""
    body = "".join(f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="kv">{body}</table>'


def _fmt_s(x: float) -> str:
    return f"{x:.0f} s" if x >= 10 else f"{x:.1f} s"


def _select_probes(kinds: Sequence[str], cap: int) -> "OrderedDict[str, List[int]]":
    """Probes to show, at most ``cap``, shared fairly between kinds (round robin); grouped by kind."""
    groups: "OrderedDict[str, List[int]]" = OrderedDict()
    for i, k in enumerate(kinds):
        groups.setdefault(k or "(no kind)", []).append(i)
    chosen: Dict[str, List[int]] = {k: [] for k in groups}
    left = cap
    pos = 0
    while left > 0 and any(pos < len(v) for v in groups.values()):
        for k, v in groups.items():
            if pos < len(v) and left > 0:
                chosen[k].append(v[pos])
                left -= 1
        pos += 1
    return OrderedDict((k, sorted(chosen[k])) for k in groups)


def _is_mixed(kind: str, meta: dict) -> bool:
    return kind == "mixed" or isinstance(meta.get("concepts"), (list, dict))


# ---------------------------------------------------------------------------------------------- sections
def _capture_cost(store: RunStore, steps: List[int], wall: List[float]) -> str:
    """What capture cost, where it ran: the featurizers' measured seconds (in the loop, in the background
    worker, in `montrage capture`) when the run logged them; otherwise an estimate from the first checkpoint."""
    from montrage.callbacks.background import capture_times

    mode = store.run_config.get("capture_mode")
    times = capture_times(store.run_dir)
    if times:
        total = wall[-1] if wall else 0.0
        loop = times.get("loop", {})
        featurized_in_loop = (mode or "inline") == "inline"
        text = [f"{mode or 'inline'} capture; in the training loop {_fmt_s(loop.get('seconds', 0.0))} over "
                f"{int(loop.get('checkpoints', 0))} checkpoint(s) ("
                + ("featurizing included" if featurized_in_loop else "snapshots only")
                + (f", {loop.get('seconds', 0.0) / total:.0%} of the loop's {_fmt_s(total)}" if total > 0 else "") + ")"]
        for where, what in (("background", "in the background worker, beside the training"),
                            ("capture", "by `montrage capture` / `attribute`, after it")):
            if where in times:
                t = times[where]
                text.append(f"{what}: {_fmt_s(t['seconds'])} for {int(t['checkpoints'])} checkpoint(s) "
                            f"({_fmt_s(t['seconds'] / max(t['checkpoints'], 1))} each)")
        return "; ".join(text)
    if not wall:
        return "not recorded"
    total, first = wall[-1], wall[0]  # checkpoint 0 is recorded before any optimizer step: capture only
    est = first * len(steps)
    cost = (f"run wall time {_fmt_s(total)} over {len(steps)} checkpoint(s); the first checkpoint (capture "
            f"only, before any training step) took {_fmt_s(first)}, so capturing all of them costs about "
            f"{_fmt_s(est)}")
    if mode in ("background", "deferred"):
        cost += (f" (this run captured {mode}, so that time was spent outside the training loop; its featurizers "
                 "logged no timings)")
    elif len(steps) > 1 and 0 < est < total:
        cost += f" ({est / total:.0%} of the run; an estimate from the first capture)"
    elif len(steps) > 1:
        cost += " (an upper bound: the first capture includes warm-up)"
    return cost


def _summary_section(store: RunStore, info: dict, colors: Dict[str, str], train_note: str,
                     have_images: bool) -> str:
    cfg = store.run_config
    capture = cfg.get("capture", {})
    lora = cfg.get("lora") or cfg.get("train", {}).get("lora") or {}
    train = cfg.get("train", {})
    steps = [int(s) for s in store.steps]
    wall = [float(w) for w in store.scalar_series(S.WALL_TIME)]
    loss = [float(x) for x in store.scalar_series(S.TRAIN_LOSS)]
    pm = store.probe_meta
    kinds = Counter(pm.get(S.ATTR_KINDS, []))
    where = ("stored in the run" if store.images_stored else
             f"source paths + hashes only, in {store.train_meta.get(S.ATTR_SOURCE_ROOT)}")
    data_cell = e(f"{cfg.get('data_dir') or store.train_meta.get(S.ATTR_SOURCE_ROOT) or 'in memory'} ({where})")
    if not have_images:
        data_cell += ' <span class="bad">(training images unavailable)</span>'
    concept_cell = " ".join(f"{_tag(c, colors)} &times;{n}" for c, n in info["concepts"].items()) or "none"
    cost = _capture_cost(store, steps, wall)
    feat = ", ".join(f"{m} ({d} features)" for m, d in info["modules"].items())
    rows = [
        ("run", e(store.run_dir)),
        ("base model", e(cfg.get("base"))),
        ("data folder", data_cell),
        ("prior folder", e(cfg.get("prior_dir") or "none")),
        ("training images", f"{info['train_images']} at {e(cfg.get('resolution'))} px"),
        ("concepts", concept_cell),
        ("probes", f"{info['probes']} ({e(', '.join(f'{k or chr(8212)}: {n}' for k, n in kinds.items()))}); "
                   f"anchors {info['anchors']}"),
        ("checkpoints", f"{len(steps)} at steps {e(steps)}" + (
            e(f"; pending (snapshot only, not in this report until `montrage capture`): {info['pending_checkpoints']}")
            if info.get("pending_checkpoints") else "")),
        ("training", e(f"{train.get('steps')} steps, batch {train.get('batch_size')}, lr {train.get('lr')}, "
                       f"warm-up {train.get('warmup_steps')}, prior fraction {train.get('prior_fraction')}, "
                       f"seed {train.get('seed')}, processes {cfg.get('world_size', 1)}") if train else
                     e(f"recorded by the user's own loop; processes {cfg.get('world_size', 1)}")),
        ("optimizer", e(f"{(cfg.get('optimizer') or {}).get('class', 'not recorded')}; learning rate at the "
                        f"checkpoints {[None if x != x else float(f'{x:.3g}') for x in store.learning_rates]}")),
        ("LoRA", e(f"rank {lora.get('r', lora.get('rank'))}, alpha {lora.get('lora_alpha', lora.get('alpha'))}, targets "
                   f"{', '.join(lora.get('target_modules', []) or []) or '?'}; "
                   f"{info['lora_parameters']:,} parameters per checkpoint")),
        ("capture", e(f"modules {feat}; timesteps {capture.get('timesteps')}; conditions "
                      f"{capture.get('conditions')}; pooling {capture.get('pooling_grid')}x{capture.get('pooling_grid')}; "
                      f"projection {capture.get('projection_dim') or 'none'}; every {capture.get('every_n_steps')} steps; "
                      f"probes with {capture.get('probe_steps')} {capture.get('probe_sampler', 'ddim')} steps, guidance {capture.get('guidance_scale')}")),
        ("cost of capture", e(cost)),
        ("store size", e(f"{info['size_total']} ({', '.join(f'{k} {v}' for k, v in info['size'].items())})")),
        ("non-finite checkpoints", e(info["nonfinite_checkpoints"] or "none")),
        ("package versions", e((", ".join(f"{k} {v}" for k, v in (info.get("package_versions") or {}).items())
                                or "not recorded") + " (recorded with the run)")),
    ]
    head = "".join(f"<th>{s}</th>" for s in steps)
    wall_row = "".join(f"<td>{w:.1f}</td>" for w in wall)
    loss_row = "".join("<td>&ndash;</td>" if not np.isfinite(x) else f"<td>{x:.4f}</td>" for x in loss)
    ck = (f'<table class="data"><tr><th>step</th>{head}</tr><tr><th>wall time (s)</th>{wall_row}</tr>'
          f'<tr><th>train loss</th>{loss_row}</tr></table>')
    curve = ""
    if len(steps) >= 2:
        curve = _img(P.training_curve(steps, wall, loss), "training loss and wall time per checkpoint", cls="fig")
    note = f'<div class="note">{e(train_note)}</div>' if train_note else ""
    return (f'<section id="summary"><h2>Run summary</h2>{note}<div class="row"><div>{_kv(rows)}</div>'
            f'<div>{ck}{curve}</div></div></section>')


def _train_figure(i: int, score: Optional[float], names: List[str], concepts: List[str], captions: List[str],
                  thumbs: Optional[Dict[int, str]], colors: Dict[str, str], exact_caption: bool = False) -> str:
    name = names[i]
    alt = f"{name}: {captions[i]}" if i < len(captions) else name
    if thumbs is not None and i in thumbs:
        pic = _img(thumbs[i], alt, P.THUMB)
    else:
        pic = f'<div class="missing" title="{e(alt)}">{e(name)}</div>'
    sc = "" if score is None else f"<br>score {score:.3f}"
    exact = ('<br><span class="exact" title="ranked first by the fused model: this image was trained under exactly '
             'the prompt">caption = prompt</span>' if exact_caption else "")
    return (f'<figure class="train">{pic}<figcaption><span class="fname">{e(name)}</span><br>'
            f'{_tag(concepts[i], colors)}{sc}{exact}</figcaption></figure>')


CHANNEL_FAMILIES = (("text/", "the prompt vs each training caption through the run's text encoder"),
                    ("rep/", "UNet representations (under the null prompt, and under the query's prompt): similarity at "
                             "the final and earlier checkpoints, co-movement, loss co-descent"),
                    ("dyn/", "the learned trajectory model (montrage-dynamics) as one channel"),
                    ("grad/", "projected LoRA gradient kernels (D-TRAK; TracIn per checkpoint)"),
                    ("pixel", "pixel similarity"), ("dup/", "near-duplicate ratio tests (copies)"),
                    ("steps/", "per-step training signals"),
                    ("class/", "a concept classifier trained on the run's own images and labels (image-only queries)"))


def _evidence_rows(payload: dict, top: int = 6) -> List[Tuple[str, str]]:
    """What the fused model weighed, per query kind (from the payload's per-query ``channels``): an auditor can
    see whether an attribution rests on the prompt, the image, or the training dynamics."""
    seen: Dict[str, Dict[str, float]] = {}
    chosen: Dict[str, str] = {}
    for q in payload.get("queries", []):
        if q.get("channels") and q.get("query_kind") and q["query_kind"] not in seen:
            seen[q["query_kind"]] = q["channels"]
            if q.get("channel_set"):
                which = CHANNEL_SET_LABELS.get(q["channel_set"], q["channel_set"])
                chosen[q["query_kind"]] = f"; {which}, chosen on held-out anchors ({q.get('channel_set_why')})"
    rows = []
    for kind, channels in sorted(seen.items()):
        total = sum(channels.values()) or 1.0
        families: Dict[str, float] = {}
        for c, w in channels.items():
            fam = next((f for f, _ in CHANNEL_FAMILIES if c.startswith(f)), c)
            families[fam] = families.get(fam, 0.0) + w / total
        best = sorted(channels.items(), key=lambda cw: -cw[1])[:top]
        fam_text = ", ".join(f"{f.rstrip('/')} {v:.0%}" for f, v in sorted(families.items(), key=lambda fv: -fv[1]))
        label = "prompt known" if kind == "prompt" else "image only"
        rows.append((f"evidence weighed ({label})", e(f"{fam_text}; largest: " +
                                                      ", ".join(f"{c} {w / total:.0%}" for c, w in best)
                                                      + chosen.get(kind, ""))))
    lifted = [q for q in payload.get("queries", []) if q.get("exact_caption_first")]
    if lifted:
        rows.append(("exact caption first", e(f"{len(lifted)} of {len(payload.get('queries', []))} queries carry a "
                                              "training caption as their prompt: the images trained under it are "
                                              "ranked first (marked \"caption = prompt\"), the rest as fitted")))
        shares = sorted({float(q["others_share"]) for q in lifted if "others_share" in q})
        if shares:
            whys = sorted({str(q.get("others_share_why") or "") for q in lifted if "others_share" in q} - {""})
            rows.append(("the other images' share", e(
                f"on those queries the other images' scores are multiplied by {', '.join(f'{x:g}' for x in shares)}: "
                "a generation of a training caption "
                + ("owes its loss to that caption's image alone; the others are listed in the model's order"
                   if 0.0 in shares else "owes its loss mostly to that caption's image")
                + (f" (why: {'; '.join(whys)})" if whys else ""))))
    if rows:
        rows.append(("channel families", e("; ".join(f"{f.rstrip('/')}: {d}" for f, d in CHANNEL_FAMILIES))))
    return rows


def _probe_section(store: RunStore, payload: dict, source: str, method: str, top_k: int, max_probes: int,
                   thumbs: Optional[Dict[int, str]], colors: Dict[str, str], progress: bool) -> str:
    pm = store.probe_meta
    tm = store.train_meta
    names, concepts = list(tm[S.ATTR_FILE_NAMES]), list(tm[S.ATTR_CONCEPTS])
    captions = list(tm.get(S.ATTR_CAPTIONS, []))
    kinds = list(pm.get(S.ATTR_KINDS, [""] * len(pm[S.ATTR_PROMPTS])))
    metas = list(pm.get(S.ATTR_META, [{}] * len(kinds)))
    images = store.probe_images(-1)
    queries = {q["id"]: q for q in payload["queries"]}
    groups = _select_probes(kinds, max_probes)
    shown = sum(len(v) for v in groups.values())
    acc = between_concept_accuracy(payload)
    head = [("method", e(method)), ("checkpoint", f"step {e(payload.get('checkpoint'))} (the final one)"),
            ("condition", e(payload.get("condition"))), ("scores", e(source)),
            ("between-concept top-1 accuracy", "n/a (no probe has an expected concept)" if acc is None else
             f"{acc:.3f} over {sum(1 for q in payload['queries'] if q.get('expected_concept'))} probes with a concept")]
    head += _evidence_rows(payload)
    parts = [f'<section id="probes"><h2>Attribution of each probe</h2>{_kv(head)}']
    if shown < len(kinds):
        parts.append(f'<div class="note">showing {shown} of {len(kinds)} probes (at most {max_probes}, shared '
                     f'between kinds)</div>')
    bar = tqdm(total=shown, disable=not progress, desc="report probes", leave=False)
    for kind, idx in groups.items():
        total = sum(1 for k in kinds if (k or "(no kind)") == kind)
        parts.append(f'<h3 id="kind-{e(kind)}">kind: {e(kind)} <span class="sub">({len(idx)} of {total} shown)</span></h3>')
        for p in idx:
            q = queries.get(f"probe-{p}")
            if q is None:
                continue
            expected = q.get("expected_concept") or ""
            predicted = q.get("predicted_concept")
            verdict = ""
            if expected:
                ok = predicted == expected
                verdict = (f'<span class="{"ok" if ok else "bad"}">{"&#10003;" if ok else "&#10007;"} '
                           f'{"matches" if ok else "expected"} {e(expected)}</span>')
            query = (f'<div class="query"><div class="prompt">{e(q["prompt"])}</div>'
                     f'{_img(P.image_data_uri(images[p]), "generated: " + q["prompt"], P.THUMB)}'
                     f'<div>probe {p}, seed {e(q.get("seed"))}</div>'
                     f'<div>predicted {_tag(predicted or "", colors)}</div><div>{verdict}</div></div>')
            exact = set(q.get("exact_caption_first") or [])
            tops = "".join(_train_figure(int(t["train_index"]), float(t["score"]), names, concepts, captions,
                                         thumbs, colors, int(t["train_index"]) in exact) for t in q["top"][:top_k])
            mixed = _is_mixed(kinds[p], metas[p] if p < len(metas) else {})
            vals = q["concept_proportions"] if mixed else q["concept_scores"]
            chart = ""
            if vals:
                chart = _img(P.concept_bars(vals, colors, expected, as_shares=mixed,
                                            shares=None if mixed else q["concept_proportions"]),
                             f"concept {'shares' if mixed else 'scores'} for {q['prompt']}", cls="fig")
            parts.append(f'<div class="card" data-probe="{p}">{query}<div class="tops">{tops}</div>'
                         f'<div class="bars">{chart}</div></div>')
            bar.update(1)
    bar.close()
    parts.append("</section>")
    return "".join(parts)


def _dynamics_probes(store: RunStore, payload: dict, n: int) -> List[int]:
    """One probe per concept (first in order), then probes without a concept, at most ``n``."""
    pc = list(store.probe_meta[S.ATTR_CONCEPTS])
    out: List[int] = []
    for c in sorted(set(pc) - {""}):
        out.append(pc.index(c))
    out += [i for i, c in enumerate(pc) if not c][:1]
    out += [i for i in range(len(pc)) if i not in out]
    return out[:n]


def _dynamics_section(store: RunStore, payload: dict, n_probes: int, colors: Dict[str, str],
                      probe_thumbs: Dict[int, str]) -> str:
    from montrage.analysis.trajectories import Dynamics, probe_trajectory

    steps = [int(s) for s in store.steps]
    K = len(steps)
    condition = "null" if "null" in store.conditions else store.conditions[0]
    cidx = store.conditions.index(condition)
    module = store.modules[-1]
    chosen = _dynamics_probes(store, payload, n_probes)
    queries = {q["id"]: q for q in payload["queries"]}
    tm = store.train_meta
    names, concepts = list(tm[S.ATTR_FILE_NAMES]), list(tm[S.ATTR_CONCEPTS])
    N = len(names)
    tops = {p: [int(t["train_index"]) for t in queries[f"probe-{p}"]["top"][:DYNAMICS_TOP]] for p in chosen}
    intro = (f'<p class="sub">For each probe (generated anew at each checkpoint): the shifted cosine (1 + cos) / 2 '
             f'between its z-normalised <b>{e(module)}</b> features and those of its top-{DYNAMICS_TOP} training '
             f'images at each checkpoint (mean over timesteps {e(store.timesteps)}, {e(condition)} prompt; dotted: '
             f'mean over each concept&#39;s images), and the denoising losses of the probe and those images.</p>')
    try:
        dyn = Dynamics(store, condition=condition, kinds=("sim",))
        q = probe_trajectory(store, condition, K - 1, chosen)
        full = len(dyn.channels) * len(chosen) * N <= _FULL_DYNAMICS_LIMIT
        cols = np.arange(N) if full else np.array(sorted({i for v in tops.values() for i in v}))
        tensor = dyn.channel_tensor(q, train_index=None if full else cols)  # (channels, Q, n)
    except (ScorerError, MontrageError) as exc:
        log.warning("report: dynamics unavailable: %s", exc)
        return (f'<section id="dynamics"><h2>Training dynamics</h2><div class="note">dynamics unavailable: '
                f'{e(exc)}</div></section>')
    sim = np.zeros((K, len(chosen), len(cols)), np.float64)
    for k in range(K):
        rows = [ci for ci, ch in enumerate(dyn.channels) if ch.kind == "sim" and ch.module == module and ch.k == k]
        sim[k] = tensor[rows].mean(0)
    col_of = {int(c): j for j, c in enumerate(cols)}
    probe_loss = np.asarray(store.array(f"{S.PROBES}/{S.LOSS}")[:K][:, chosen, cidx], np.float64).mean(-1)  # (K, Q)
    top_all = sorted({i for v in tops.values() for i in v})
    train_loss = np.asarray(store.array(f"{S.TRAIN}/{S.LOSS}").oindex[:K, top_all, cidx], np.float64).mean(-1)
    tl_of = {i: j for j, i in enumerate(top_all)}
    parts = [f'<section id="dynamics"><h2>Training dynamics</h2>{intro}']
    prompts = store.probe_meta[S.ATTR_PROMPTS]
    for qi, p in enumerate(chosen):
        sim_lines, loss_lines = [], []
        if full:
            for c in sorted(set(concepts) - {""}):
                members = [col_of[i] for i, cc in enumerate(concepts) if cc == c]
                sim_lines.append({"label": f"mean: {c}", "values": sim[:, qi, members].mean(1),
                                  "color": P.color_of(colors, c), "style": ":", "marker": "", "lw": 1.1})
        loss_lines.append({"label": f"probe {p} (generated)", "values": probe_loss[:, qi], "color": "black",
                           "lw": 2.0})
        styles = ["-", "--", "-."]
        for r, i in enumerate(tops[p]):
            label = f"#{r + 1} {names[i]}"
            st = styles[r % len(styles)]
            sim_lines.append({"label": label, "values": sim[:, qi, col_of[i]], "color": P.color_of(colors, concepts[i]),
                              "style": st})
            loss_lines.append({"label": label, "values": train_loss[:, tl_of[i]],
                               "color": P.color_of(colors, concepts[i]), "style": st})
        fig = P.dynamics_figure(steps, f"probe {p}: {prompts[p]}", sim_lines, loss_lines)
        parts.append(f'<div class="dyn" data-probe="{p}"><figure>{_img(probe_thumbs[p], prompts[p], P.THUMB)}'
                     f'<figcaption>{e(prompts[p])}</figcaption></figure>'
                     f'<img class="fig" src="{e(fig)}" alt="{e("dynamics of probe " + str(p))}"></div>')
    parts.append("</section>")
    return "".join(parts)


def _compare_section(result: Optional[dict], source: str) -> str:
    parts = ['<section id="learning"><h2>When each concept was learned</h2>']
    if result is None:
        parts.append(f'<div class="note">{e(source)}</div></section>')
        return "".join(parts)
    learned = result.get("learned_at", {})
    rows = [(c, "not yet (the share of its probes attributed to it never stays at 0.5 or more)" if s is None
             else f"step {e(s)}") for c, s in learned.items()]
    intro = (f'<p class="sub">{e(result.get("method"))} at each checkpoint on the probes generated there ({e(source)}); '
             f'a concept counts as learned from the first checkpoint after which at least half of its probes '
             f'stay attributed to it.</p>')
    if not result.get("curves") or not result.get("steps"):
        fig = '<div class="note">no concept curves in this comparison (the run has no concepts)</div>'
    else:
        fig = None
    try:
        fig = fig or _img(P.learning_curves(result), "learning curves per concept", cls="fig")
    except Exception as exc:  # a malformed precomputed dict should not sink the whole report
        log.warning("report: could not plot the learning curves: %s", exc)
        fig = f'<div class="note">could not plot the learning curves: {e(exc)}</div>'
    moved = result.get("most_changed") or []
    table = ""
    if moved:
        body = "".join(f'<tr><td style="text-align:left">{e(r["prompt"])}</td><td>{r["share_change"]:.2f}</td>'
                       f'<td style="text-align:left">{e(r["top_from"])}</td><td style="text-align:left">'
                       f'{e(r["top_to"])}</td></tr>' for r in moved)
        table = (f'<h3>Probes whose attribution moved most (step {e(result.get("from"))} &rarr; '
                 f'{e(result.get("to"))})</h3><table class="data"><tr><th>prompt</th><th>share change</th>'
                 f'<th>top image before</th><th>top image after</th></tr>{body}</table>')
    learned_html = _kv([(c, v) for c, v in rows])
    parts.append(f"{intro}{learned_html}{fig}{table}</section>")
    return "".join(parts)


def _grid_section(store: RunStore, max_columns: int) -> str:
    prompts = list(store.probe_meta[S.ATTR_PROMPTS])
    cols: List[int] = []
    seen = set()
    for i, pr in enumerate(prompts):  # the first seed of each distinct prompt
        if pr not in seen:
            seen.add(pr)
            cols.append(i)
    cols = cols[:max_columns]
    steps = [int(s) for s in store.steps]
    imgs = np.asarray(store.array(f"{S.PROBES}/{S.IMAGES}")[: len(steps)][:, cols])
    head = "".join(f'<th title="{e(prompts[p])}">{e(prompts[p])}</th>' for p in cols)
    rows = []
    for k, step in enumerate(steps):
        cells = "".join(f"<td>{_img(P.image_data_uri(imgs[k, j], P.GRID_THUMB), f'step {step}: {prompts[p]}', P.GRID_THUMB)}</td>"
                        for j, p in enumerate(cols))
        rows.append(f'<tr class="ckpt-row" data-step="{step}"><th class="step">step {step}</th>{cells}</tr>')
    note = "" if len(cols) == len(seen) else f" (first {len(cols)} of {len(seen)} prompts)"
    return (f'<section id="grid"><h2>Probe generations across checkpoints</h2><p class="sub">One seed per prompt'
            f'{e(note)}, same seed at every checkpoint: the model learning, row by row.</p>'
            f'<table class="grid"><tr><th class="step">checkpoint</th>{head}</tr>{"".join(rows)}</table></section>')


# ---------------------------------------------------------------------------------------------- entry point
def build_report(run_dir: str | Path, method: str = "montrage", out: Optional[str | Path] = None,
                 progress: bool = True, top_k: int = 6, *, attribution: Optional[AttributionResult | dict] = None,
                 compare_result: Optional[dict] = None, max_probes: int = MAX_PROBES,
                 dynamics_probes: int = DYNAMICS_PROBES, grid_columns: int = GRID_COLUMNS,
                 reuse: bool = True, base: Optional[str] = None) -> Path:
    """Write the self-contained HTML report of ``run_dir`` (default ``RUN/report.html``) and return its path.

    ``attribution`` (an :class:`AttributionResult` or its payload at the final checkpoint) and
    ``compare_result`` (the dict of :func:`montrage.analysis.compare.compare`) skip recomputing them.
    With ``reuse`` (default), ``RUN/attribution_<method>_<step>.json`` and ``RUN/compare_<method>.json``
    are read instead when they were written after the store's last checkpoint and match the run;
    otherwise they are computed (nothing is written to the store). ``base``: the run's base model folder when
    it is no longer where the run recorded it.
    """
    store = RunStore.open(run_dir)
    store.checkpoint_index(None)  # raises CheckpointNotFoundError when nothing is committed yet
    out = Path(out) if out is not None else Path(run_dir) / "report.html"
    top_k = max(1, int(top_k))
    _, info = summary(run_dir)
    colors = P.concept_colors(store.concepts)
    options = {"base": str(base)} if base else None
    payload, att_source = _attribution(store, method, top_k, attribution, reuse, progress, options)
    shown = [t["train_index"] for q in payload.get("queries", []) for t in q.get("top", [])[:top_k]]
    train_images, train_note = _load_training_images(store, shown)  # only the thumbnails the page shows
    thumbs = None if train_images is None else {i: P.image_data_uri(im) for i, im in train_images.items()}
    cmp, cmp_source = _compare(store, method, compare_result, reuse, progress, options)
    final_images = store.probe_images(-1)
    probe_thumbs = {p: P.image_data_uri(final_images[p]) for p in range(final_images.shape[0])}

    sections = [
        _summary_section(store, info, colors, train_note, train_images is not None),
        _probe_section(store, payload, att_source, method, top_k, max_probes, thumbs, colors, progress),
        _dynamics_section(store, payload, dynamics_probes, colors, probe_thumbs),
        _compare_section(cmp, cmp_source),
        _grid_section(store, grid_columns),
    ]
    now = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    nav = "".join(f'<a href="#{a}">{t}</a>' for a, t in (("summary", "summary"), ("probes", "attribution"),
                                                          ("dynamics", "dynamics"), ("learning", "learning curves"),
                                                          ("grid", "checkpoint grid")))
    where = Path(run_dir).resolve()
    title = f"montrage report: {'/'.join(where.parts[-2:]) if len(where.parts) > 2 else where} ({method})"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{e(_CSP)}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{e(title)}</title><style>{_CSS}</style><script>{_SCRIPT}</script></head>'
            f'<body><main><h1>{e(title)}</h1><p class="sub">run {e(Path(run_dir).resolve())} &middot; method '
            f'{e(method)} &middot; generated {e(now)}</p><nav>{nav}</nav>{"".join(sections)}</main></body></html>\n')
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    log.info("report: wrote %s (%.1f KiB)", out, out.stat().st_size / 1024)
    return out

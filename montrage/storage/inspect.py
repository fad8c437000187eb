"""A human-readable summary of a run store (``montrage inspect``)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Tuple

from montrage.storage import schema as S
from montrage.storage.store import RunStore


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def summary(run_dir: str | Path) -> Tuple[str, dict]:
    store = RunStore.open(run_dir)
    root = RunStore.store_path(run_dir)
    cfg = store.run_config
    tm, pm = store.train_meta, store.probe_meta
    concepts = Counter(tm.get(S.ATTR_CONCEPTS, []))
    feat_dims = {m: int(store.array(S.feature_path(S.TRAIN, m)).shape[-1]) for m in store.modules}
    attributions = [f"{a['method']}@{a['step']}[{a['query_set']}: {len(a['query_ids'])} queries]"
                    for a in store.attributions()]
    data = {
        "run": str(run_dir), "layout_version": store.root.attrs[S.ATTR_LAYOUT], "base": cfg.get("base"),
        "checkpoints": store.n_checkpoints, "steps": store.steps.tolist(),
        "wall_time_s": [round(float(x), 1) for x in store.scalar_series(S.WALL_TIME)],
        "train_loss": [None if x != x else round(float(x), 5) for x in store.scalar_series(S.TRAIN_LOSS)],
        "train_images": len(tm.get(S.ATTR_FILE_NAMES, [])), "concepts": dict(sorted(concepts.items())),
        "probes": len(pm.get(S.ATTR_PROMPTS, [])), "probe_prompts": sorted(set(pm.get(S.ATTR_PROMPTS, [])))[:12],
        "anchors": len(store.anchor_indices), "modules": feat_dims, "conditions": store.conditions,
        "timesteps": store.timesteps, "pooling_grid": store.capture.get("pooling_grid"),
        "lora_parameters": int(store.array(f"{S.LORA}/{S.WEIGHTS}").shape[1]), "lora": cfg.get("lora"),
        "training_images": ("stored in the run" if store.images_stored else
                            f"source paths + sha256 only ({tm.get(S.ATTR_SOURCE_ROOT)})"),
        "learning_rate": [None if x != x else float(x) for x in store.learning_rates],
        "pending_checkpoints": store.pending_steps,  # snapshotted by the loop, not featurized yet
        "nonfinite_checkpoints": store.nonfinite_checkpoints, "attributions": sorted(attributions),
        "size": {name: _mb(_du(root / name)) for name in (S.TRAIN, S.ANCHORS, S.PROBES, S.LORA, S.ATTRIBUTION)},
        "size_total": _mb(_du(root)), "package_versions": store.root.attrs.get(S.ATTR_VERSIONS, {}),
    }
    lora = data["lora"] or {}
    lines = [
        f"run            {data['run']}  (layout v{data['layout_version']}, base {data['base']})",
        f"checkpoints    {data['checkpoints']} at steps {data['steps']}"
        + (f"; pending (snapshot only, `montrage capture` featurizes): {data['pending_checkpoints']}"
           if data["pending_checkpoints"] else ""),
        f"wall time (s)  {data['wall_time_s']}",
        f"train loss     {data['train_loss']}",
        f"training set   {data['train_images']} images; concepts: "
        + (", ".join(f"{c or '(none)'}={n}" for c, n in data["concepts"].items()) or "none"),
        f"probes         {data['probes']} ({len(set(pm.get(S.ATTR_PROMPTS, [])))} prompts), anchors {data['anchors']}",
        f"captured       modules {feat_dims} x conditions {data['conditions']} x timesteps {data['timesteps']}, "
        f"pooling {data['pooling_grid']}x{data['pooling_grid']}",
        f"LoRA           {data['lora_parameters']} parameters per checkpoint; r {lora.get('r', lora.get('rank'))}, "
        f"alpha {lora.get('lora_alpha', lora.get('alpha'))}, targets {lora.get('target_modules')}",
        f"learning rate  {data['learning_rate']}",
        f"images         {data['training_images']}",
        f"size           {data['size_total']} ({', '.join(f'{k} {v}' for k, v in data['size'].items())})",
        f"non-finite     {data['nonfinite_checkpoints'] or 'none'}",
        f"attributions   {', '.join(data['attributions']) or 'none yet'}",
    ]
    return "\n".join(lines), data

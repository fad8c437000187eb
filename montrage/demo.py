"""``montrage demo``: the whole product on the embedded default, in a few minutes on 2 CPU cores.

synthetic artists dataset -> LoRA training with the monitor -> attribute -> compare -> report.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

from montrage.analysis.attribute import attribute, between_concept_accuracy, write_json
from montrage.analysis.compare import compare
from montrage.config import CaptureConfig, TrainConfig
from montrage.data.synthetic import write_concept_dataset, write_prior_dataset
from montrage.storage.inspect import summary
from montrage.training import train

log = logging.getLogger(__name__)


def run_demo(out: str | Path = "montrage-demo", steps: Optional[int] = None, quick: bool = False,
             progress: bool = True) -> dict:
    out = Path(out)
    t0 = time.time()
    n_artists, per_artist = (2, 6) if quick else (3, 8)
    steps = steps or (120 if quick else 400)
    every = max(1, steps // (3 if quick else 4))
    data = write_concept_dataset(out / "data", n_artists=n_artists, images_per_artist=per_artist, seed=0)
    prior = write_prior_dataset(out / "prior", n_images=32, seed=1)
    print(f"[1/5] dataset: {n_artists} artists x {per_artist} images in {data} (+ prior-preservation {prior})")
    cfg = TrainConfig(steps=steps, batch_size=8, lr=2e-3, prior_fraction=0.25)
    capture = CaptureConfig(every_n_steps=every, probe_steps=15 if quick else 25)
    run = out / "run"
    res = train(data, run, cfg=cfg, capture=capture, prior_dir=prior, progress=progress)
    print(f"[2/5] trained {steps} steps with the monitor in {res.wall_time_s:.0f} s -> {run}")
    print(summary(run)[0])
    att = attribute(run, "montrage", progress=progress)
    write_json(att.payload, run / f"attribution_montrage_{att.step}.json")
    acc = between_concept_accuracy(att.payload)
    print(f"[3/5] attribution (montrage): between-concept top-1 accuracy {acc:.3f} over "
          f"{sum(1 for q in att.payload['queries'] if q['expected_concept'])} single-concept probes")
    cmp = compare(run, "montrage", plot=run / "compare_montrage.png", progress=progress)
    write_json(cmp, run / "compare_montrage.json")
    print(f"[4/5] compare: learned at {cmp['learned_at']}; plot {cmp['plot']}")
    report_path = None
    try:
        from montrage.report import build_report
    except ImportError:  # the report module is optional in minimal installs
        build_report = None
    if build_report is not None:
        report_path = build_report(run, method="montrage", progress=progress)
        print(f"[5/5] report: {report_path}")
    wall = time.time() - t0
    print(f"demo finished in {wall:.0f} s")
    return {"run": str(run), "accuracy": acc, "compare": cmp, "report": str(report_path) if report_path else None,
            "wall_time_s": wall}

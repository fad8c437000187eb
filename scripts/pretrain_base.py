"""Rebuild the embedded base model shipped in montrage/models/assets/embedded_base.

    python scripts/pretrain_base.py [--steps 3000] [--out montrage/models/assets/embedded_base]
"""
import argparse

from montrage.models.pretrain import pretrain_base

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="montrage/models/assets/embedded_base")
    args = ap.parse_args()
    print(pretrain_base(args.out, steps=args.steps, seed=args.seed))

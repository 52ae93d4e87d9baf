"""Write the synthetic ADE20K-layout dataset used by the demo configs.

Example:
    python tools/make_synthetic_ade.py --out data/synthetic_ade --num-train 600 --num-val 100
"""

import argparse
import time
from pathlib import Path

from fatr_seg.datasets.synthetic import is_complete, write_dataset


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="data/synthetic_ade", help="dataset root")
    parser.add_argument("--num-train", type=int, default=600, help="training images")
    parser.add_argument("--num-val", type=int, default=100, help="validation images")
    parser.add_argument(
        "--size", type=int, nargs="+", default=[384, 384], metavar="N", help="H W, or one int"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="regenerate even if complete")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    if len(args.size) == 1:
        args.size = args.size * 2
    if len(args.size) != 2 or min(args.size) < 1:
        parser.error(f"--size takes one or two positive ints, got {args.size}")
    if args.num_train < 0 or args.num_val < 0:
        parser.error("--num-train and --num-val must be >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    settings = dict(
        num_train=args.num_train, num_val=args.num_val, size=tuple(args.size), seed=args.seed
    )
    out = Path(args.out).resolve()
    if not args.force and is_complete(out, **settings):
        print(f"synthetic ADE20K already complete at {out} (use --force to regenerate)")
        return
    start = time.perf_counter()
    counts = write_dataset(out, progress=not args.no_progress, force=True, **settings)
    elapsed = time.perf_counter() - start
    h, w = args.size
    print(
        f"wrote {counts['training']} training + {counts['validation']} validation images "
        f"({h}x{w}, seed {args.seed}) to {out} in {elapsed:.1f}s"
    )


if __name__ == "__main__":
    main()

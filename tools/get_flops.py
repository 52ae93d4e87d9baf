"""Count MACs of segmentors built from configs, or reproduce the paper's MAC table.

Usage::

    python tools/get_flops.py CONFIG [CONFIG ...] --shape H [W] [--json PATH]
    python tools/get_flops.py --paper-table [--only NAME ...] [--json PATH]

With several configs the first is the reference and the others get ratios against it. MACs are
counted by :func:`fatr_seg.analysis.count_macs` (``FlopCounterMode`` plus the fused-attention
and in-place matmul formulas it lacks), for ONE image of the given shape, on CPU:

* ``backbone``: ``model.backbone(x)``: patch embedding, blocks, reduction overhead (scoring,
  the DC term of the reweighted attention) and restoration;
* ``segmentor``: ``model.encode_decode(x, metas)``: backbone, decode head and the final resize
  (what mmseg's whole-image inference runs).

MACs = FLOPs / 2 of matmul-like ops; elementwise ops count zero. Pretrained weights are never
loaded (``init_cfg`` is cleared): the count depends on shapes only.

The counting and the tables are :mod:`fatr_seg.analysis.flops_report`; this file is the command
line.

JSON schema (``--json``), compare mode::

    {"schema": "fatr_seg.get_flops/1", "unit": "MACs", "shape": [H, W], "tokens": N,
     "torch": str, "date": str,
     "models": [{"config": path, "name": str,
                 "backbone":  {"macs": int, "gmacs": float, "by_op": {op: int},
                               "scoring_macs": int, "dc_term_macs": int,
                               "dc_aggregation_adds": int, "moved_elements": int},
                 "segmentor": {same keys},
                 "decode_head_macs": int,            # segmentor - backbone
                 "ratio": {"backbone": float, "segmentor": float}}]}  # vs the first config

``--paper-table``::

    {"schema": "fatr_seg.get_flops.paper_table/1", "unit": "GMACs", "tolerance": 0.02,
     "reduction": {...}, "rows": [{"model": str, "input": int, "patch": int, "tokens": int,
       "baseline": float, "fatr_counted": float, "fatr_tokens_only": float,
       "scoring_overhead": float, "dc_term_overhead": float,
       "paper_baseline": float, "paper_fatr": float,
       "rel_diff": {"baseline": float, "fatr_counted": float, "fatr_tokens_only": float},
       "within_rounding": {same keys: bool}}]}
"""

import argparse
import os
import os.path as osp
import sys
import warnings

warnings.filterwarnings("ignore", message="pkg_resources is deprecated")

from fatr_seg.analysis.flops_report import (
    PAPER_MACS,
    compare,
    format_compare,
    format_paper_table,
    paper_table,
)
from fatr_seg.analysis.store import write_json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="Count backbone and segmentor MACs (fused attention and reduction overhead "
        "included), or print the paper's MAC table beside ours."
    )
    parser.add_argument("configs", nargs="*", help="config file(s); the first is the reference")
    parser.add_argument(
        "--shape",
        type=int,
        nargs="+",
        metavar="PX",
        help="input height and width in pixels, H [W] (required unless --paper-table)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON here")
    parser.add_argument(
        "--paper-table",
        action="store_true",
        help="count the paper's classification ViTs and compare",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        help="with --paper-table: only these models, e.g. DeiT-S/16",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        default=None,
        metavar="KEY=VALUE",
        help="override config settings, as in mmseg's tools",
    )
    args = parser.parse_args(argv)
    if args.paper_table:
        if args.configs:
            parser.error("--paper-table takes no configs")
        known = [row[0] for row in PAPER_MACS]
        unknown = sorted(set(args.only or ()) - set(known))
        if unknown:
            parser.error(f"--only: unknown model(s) {unknown}; choose from {known}")
    else:
        if args.only:
            parser.error("--only is for --paper-table")
        if not args.configs:
            parser.error("give at least one CONFIG (or --paper-table)")
        if args.shape is None:
            parser.error("--shape H W is required: MACs depend on the input size")
        if len(args.shape) not in (1, 2) or min(args.shape) < 1:
            parser.error(f"--shape takes H [W], positive; got {args.shape}")
        for path in args.configs:
            if not osp.isfile(path):
                parser.error(f"config not found: {path}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg_options = None
    if args.cfg_options:
        from mmengine.config import DictAction

        ns = argparse.Namespace()
        DictAction(option_strings=[], dest="opts")(None, ns, args.cfg_options)
        cfg_options = ns.opts
    if args.paper_table:
        result = paper_table(args.only)
        print(format_paper_table(result))
    else:
        shape = tuple(args.shape) * (2 if len(args.shape) == 1 else 1)
        result = compare(args.configs, shape, cfg_options)
        print(format_compare(result))
    if args.json:
        os.makedirs(osp.dirname(osp.abspath(args.json)), exist_ok=True)
        write_json(args.json, result)
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

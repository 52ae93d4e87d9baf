"""What the summarise_*.py provenance scripts share: arguments, paired deltas, speed-ups, the
standard columns and the file layout of a results/*.json (see results/README.md)."""

import json
import math
import shlex
import statistics
import sys

MACHINE = "the project's 2-core x86_64 CPU machine, no GPU"
STACK = "Python 3.11.7, torch 2.14.1, mmsegmentation 1.2.2"  # of the CamVid study runs
# The columns several result files show, by key (a script names them in its own order).
COLUMNS = {
    "method": {"label": "method", "align": "left", "format": "{method}", "link": "config"},
    "backbone_gmacs": {"label": "backbone GMACs", "format": "{backbone_gmacs:.3f}"},
    "speedup": {"label": "speed-up b1 / b8", "format": "{speedup_b1:.2f}× / {speedup_b8:.2f}×"},
    "miou_free": {"label": "mIoU training-free", "format": "{miou_free:.2f}"},
    "miou_ft": {"label": "mIoU fine-tuned", "format": "{miou_ft:.2f}"},
}


def frontier_run(work_dir: str) -> str:
    """The command of a CamVid study run with the frontier's settings (the 352² baseline, 3 seeds,
    the unreduced model fine-tuned and every reduction applied to its weights) into ``work_dir``,
    up to its ``--variants``."""
    return (
        "python tools/camvid_study.py --data-root ../shared/data/camvid --baseline-checkpoint "
        f"baseline_500_352.pth --work-dir {work_dir} --model-config "
        "configs/camvid/fatr_vit-t_camvid.py --methods none fatr_local --seeds 0 1 2 "
        "--ft-iters 100 --base-iters 500 --crop-size 352 --threads 2 --finetune-as unreduced"
    )


def argv() -> tuple[str, str, str]:
    """``RAW OUT COMMIT``: the raw study file, the results file to write, the commit it ran on."""
    return sys.argv[1], sys.argv[2], sys.argv[3]


def raw() -> dict:
    """The raw file ``RAW`` of the command line, loaded."""
    with open(argv()[0]) as f:
        return json.load(f)


def paired(diffs: list[float]) -> tuple[float, float | None]:
    """Mean of paired differences and its standard error (None for one pair)."""
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    return statistics.fmean(diffs), se


def speedups(cost: dict, key: str, batches=("b1", "b8")) -> dict[str, float]:
    """``speedup_b1``, ...: images/s of ``key`` over the unreduced model's, per batch."""
    ips = cost["images_per_s"]
    return {f"speedup_{b}": ips[b][key]["median"] / ips[b]["none"]["median"] for b in batches}


def columns(keys: str, **own: dict) -> dict:
    """The columns ``keys`` (space-separated) in this order: a script's ``own`` spec, else
    :data:`COLUMNS`'."""
    return {k: own[k] if k in own else COLUMNS[k] for k in keys.split()}


def text(label: str, key: str, left: bool = True) -> dict:
    """A column showing the row's ``key`` as it is (left-aligned unless ``left`` is False)."""
    return {"label": label, **({"align": "left"} if left else {}), "format": "{" + key + "}"}


def paired_delta(label: str, key: str, empty: bool = True) -> dict:
    """A column of the paired difference ``key`` ± its standard error ``key_se`` (:func:`paired`);
    "—" where the row has none, unless ``empty`` is False."""
    spec = {"label": label, "format": f"{{{key}:+.2f}} ± {{{key}_se:.2f}}"}
    return {**spec, "empty": "—"} if empty else spec


def write(title, date, machine, command, protocol, columns, rows, how="", **extra) -> dict:
    """Write the results file ``OUT`` of the command line: its provenance (``command``: what
    made ``RAW``; this script's own command line is added last, as ``COMMIT``), ``columns`` and
    ``rows``. ``how``: what ``RAW`` is, for the ``source`` line; ``extra``: after ``commit``."""
    raw, out, commit = argv()
    ours = ["python", *sys.argv[:3], "COMMIT", *map(shlex.quote, sys.argv[4:])]
    result = dict(
        title=title,
        source=f"summarised from results/raw/{raw.split('/')[-1]}{how} by the command's last line",
        date=date,
        commit=commit,
        **extra,
        machine=machine,
        command=[*command, " ".join(ours)],
        protocol=protocol,
        columns=columns,
        rows=rows,
    )
    with open(out, "w") as f:
        json.dump(result, f, indent=1, ensure_ascii=False)
    return result

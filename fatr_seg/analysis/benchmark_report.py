"""Reports of a ``tools/benchmark.py`` result: ``benchmark.json``, ``benchmark.md``
(:func:`to_markdown`) and ``speedup.png`` (:func:`plot_speedup`). matplotlib is imported only to
plot.
"""

from __future__ import annotations

import os.path as osp

from .store import write_files
from .tables import fmt, markdown_section

__all__ = ["plot_speedup", "to_markdown", "write_outputs"]

_CELL = ["target", "dtype", "shape", "tokens", "batch", "config"]


def _mib(n) -> str:
    return fmt(n and n / 2**20, ",.0f", "-")


def _cell(r: dict) -> list:
    """The leading cells of a timing or memory row: what ran, on what, with which config."""
    shape = f"{r['shape'][0]}x{r['shape'][1]}"
    return [r["target"], r["dtype"], shape, r["tokens"], r["batch"], r["config"]]


def to_markdown(result: dict) -> str:
    """The result as markdown: settings, then a table per measurement that has rows."""
    s, m = result["settings"], result["machine"]
    lines = [
        f"# Benchmark {result['date']}", "",
        f"- command: `{result['command']}`",
        f"- machine: {m['device']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, "
        f"load average at start {m['load_avg']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- device {s['device']}, dtypes {s['dtypes']}, {s['warmup']} warm-up + {s['iters']} "
        f"timed rounds, configs alternating; reference: `{result['reference']}`"
        + ("; times are the calling thread's CPU time" if s.get("cpu_time") else ""), "",
    ]  # fmt: skip
    if result["macs"]:
        rows = [[r["config"], f"{r['shape'][0]}x{r['shape'][1]}", r["tokens"],
                 f"{r['backbone'] / 1e9:.2f}", f"{r['scoring'] / 1e9:.3f}",
                 fmt(r.get("segmentor") and r["segmentor"] / 1e9, ".2f", "-")]
                for r in result["macs"]]  # fmt: skip
        lines += markdown_section("MACs (one image)", ["config", "shape", "tokens",
                                  "backbone GMACs", "of which scoring", "segmentor GMACs"], rows,
                                  left=2)  # fmt: skip
    if result["timing"]:
        compiled = any(r.get("compiled") for r in result["timing"])
        note = (
            "Images/s: median [q1, q3] over the timed rounds. speed-up: reference median "
            "time / this median time (paired: median of per-round ratios). ideal: the MACs "
            "ratio's inverse; speed-up/ideal = 1 means the MAC cut is fully realised."
        )
        header = _CELL + ["images/s", "speed-up", "paired", "ideal", "speed-up/ideal"]
        if compiled:  # compiled twins: their speed-up against the compiled reference too
            note += " same-mode speed-up: against the reference run the same way."
            header.append("same-mode speed-up")
        rows = []
        for r in result["timing"]:
            ips, ratio = r["images_per_s"], r["macs_ratio"]
            rows.append(_cell(r) + [
                f"{ips['median']:.3f} [{ips['q1']:.3f}, {ips['q3']:.3f}]", f"{r['speedup']:.3f}",
                f"{r['speedup_paired']:.3f}", fmt(1 / ratio if ratio else None, ".3f", "-"),
                fmt(r["speedup_per_ideal"], ".3f", "-")]
                + ([f"{r['speedup_same_mode']:.3f}"] if compiled else []))  # fmt: skip
        lines += markdown_section("Throughput", header, rows, note, 3)
    if result["skipped"]:
        lines += ["## Skipped", ""] + [
            f"- {r['kind']} {r['target']} {r['dtype']} {r['shape'][0]}x{r['shape'][1]} "
            f"batch {r['batch']}: {r['reason']}" for r in result["skipped"]] + [""]  # fmt: skip
    if result["memory"]:
        note = ("CPU: peak RSS of a fresh child process during one pass (peak) and its growth "
                "over the RSS before the pass (forward); tensors: peak of live tensor bytes "
                "during a second, profiled pass (the allocator's retained memory excluded). A "
                "pass is one forward, or for `train` one training step (forward, loss, "
                "backward). CUDA: max_memory_allocated.")  # fmt: skip
        rows = [_cell(r) + ([f"error: {r['error']}", "", "", ""] if r.get("error") else [
                _mib(r["peak_bytes"]), _mib(r["before_bytes"]), _mib(r["forward_bytes"]),
                _mib(r.get("tensor_peak_bytes"))]) for r in result["memory"]]  # fmt: skip
        lines += markdown_section("Peak memory (MiB)", _CELL + ["peak", "before", "forward",
                                  "tensors"], rows, note, 3)  # fmt: skip
    return "\n".join(lines)


def plot_speedup(result: dict, path: str) -> None:
    """Speed-up vs tokens, one line per (config, target, batch, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict = {}
    for r in result["timing"]:
        if r["config"] != result["reference"]:
            key = (r["config"], r["target"], r["batch"], r["dtype"])
            series.setdefault(key, []).append((r["tokens"], r["speedup"]))
    for (name, target, batch, dtype), pts in sorted(series.items()):
        ax.plot(*zip(*sorted(pts)), marker="o", label=f"{name} {target} b{batch} {dtype}")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("patch tokens")
    ax.set_ylabel(f"speed-up vs {result['reference']}")
    ax.set_title(f"{result['machine']['device']} ({result['settings']['device']})")
    if series:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no timed cells", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict, out_dir: str) -> tuple[dict[str, str], str]:
    """Write ``benchmark.{json,md}`` and ``speedup.png`` under ``out_dir``; their paths (keys
    ``json``, ``md``, ``png``) and the markdown."""
    markdown = to_markdown(result)
    paths = write_files(out_dir, "benchmark", result, markdown + "\n")
    paths["png"] = osp.join(out_dir, "speedup.png")
    plot_speedup(result, paths["png"])
    return paths, markdown

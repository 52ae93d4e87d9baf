"""Reports of a benchmark result (:func:`fatr_seg.analysis.benchmark.benchmark`).

:func:`write_outputs` writes ``benchmark.json``, ``benchmark.md`` (:func:`to_markdown`) and
``speedup.png`` (:func:`plot_speedup`) into one folder. matplotlib is imported only to plot.
"""

from __future__ import annotations

import os
import os.path as osp

from .store import write_json

__all__ = ["plot_speedup", "to_markdown", "write_outputs"]


def _fmt_bytes(n) -> str:
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _cell(r: dict) -> str:
    """The leading columns of a timing or memory row: what ran, on what, with which config."""
    return (
        f"| {r['target']} | {r['dtype']} | {r['shape'][0]}x{r['shape'][1]} "
        f"| {r['tokens']} | {r['batch']} | {r['config']} "
    )


def to_markdown(result: dict) -> str:
    """The result as markdown: settings, then one table per measurement (MACs, throughput,
    skipped cells, peak memory, scoring paths); tables without rows are left out."""
    s = result["settings"]
    m = result["machine"]
    lines = [
        f"# Benchmark {result['date']}",
        "",
        f"- command: `{result['command']}`",
        f"- machine: {m['device']}, {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, "
        f"load average at start {m['load_avg']}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}",
        f"- device {s['device']}, dtypes {s['dtypes']}, {s['warmup']} warm-up + {s['iters']} "
        f"timed rounds, configs alternating; reference: `{result['reference']}`"
        + ("; times are the calling thread's CPU time" if s.get("cpu_time") else ""),
        "",
    ]
    if result["macs"]:
        lines += [
            "## MACs (one image)",
            "",
            "| config | shape | tokens | backbone GMACs | of which scoring | segmentor GMACs |",
            "|---|---|---:|---:|---:|---:|",
        ]
        for r in result["macs"]:
            seg = r.get("segmentor")
            seg = "-" if seg is None else f"{seg / 1e9:.2f}"
            lines.append(
                f"| {r['config']} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} "
                f"| {r['backbone'] / 1e9:.2f} | {r['scoring'] / 1e9:.3f} "
                f"| {seg} |"
            )
        lines.append("")
    if result["timing"]:
        lines += [
            "## Throughput",
            "",
            "Images/s: median [q1, q3] over the timed rounds. speed-up: reference median time / "
            "this median time (paired: median of per-round ratios). ideal: the MACs ratio's "
            "inverse; speed-up/ideal = 1 means the MAC cut is fully realised.",
            "",
            "| target | dtype | shape | tokens | batch | config | images/s | speed-up | paired "
            "| ideal | speed-up/ideal |",
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        compiled = any(r.get("compiled") for r in result["timing"])
        if compiled:  # compiled twins: add their speed-up against the compiled reference
            lines[-2] += " same-mode speed-up |"
            lines[-4] += (" same-mode speed-up: against the reference run the same way "
                          "(compiled vs compiled).")  # fmt: skip
            lines[-1] += "---:|"
        for r in result["timing"]:
            ips = r["images_per_s"]
            ratio, per_ideal = r["macs_ratio"], r["speedup_per_ideal"]
            ideal = "-" if not ratio else f"{1 / ratio:.3f}"
            per_ideal = "-" if per_ideal is None else f"{per_ideal:.3f}"
            lines.append(
                _cell(r) + f"| {ips['median']:.3f} [{ips['q1']:.3f}, {ips['q3']:.3f}] "
                f"| {r['speedup']:.3f} | {r['speedup_paired']:.3f} | {ideal} | {per_ideal} |"
                + (f" {r['speedup_same_mode']:.3f} |" if compiled else "")
            )
        lines.append("")
    if result["skipped"]:
        lines += ["## Skipped", ""]
        for r in result["skipped"]:
            lines.append(
                f"- {r['kind']} {r['target']} {r['dtype']} {r['shape'][0]}x{r['shape'][1]} "
                f"batch {r['batch']}: {r['reason']}"
            )
        lines.append("")
    if result["memory"]:
        lines += [
            "## Peak memory (MiB)",
            "",
            "CPU: peak RSS of a fresh child process during one pass (peak) and its growth "
            "over the RSS before the pass (forward); tensors: peak of live tensor bytes "
            "during a second, profiled pass (the allocator's retained memory excluded). A pass "
            "is one forward, or for `train` one training step (forward, loss, backward). "
            "CUDA: max_memory_allocated.",
            "",
            "| target | dtype | shape | tokens | batch | config | peak | before | forward "
            "| tensors |",
            "|---|---|---|---:|---:|---|---:|---:|---:|---:|",
        ]
        for r in result["memory"]:
            if r.get("error"):
                tail = f"| error: {r['error']} | | | |"
            else:
                tensors = r.get("tensor_peak_bytes")
                tail = (
                    f"| {_fmt_bytes(r['peak_bytes'])} | {_fmt_bytes(r['before_bytes'])} "
                    f"| {_fmt_bytes(r['forward_bytes'])} "
                    f"| {'–' if tensors is None else _fmt_bytes(tensors)} |"
                )
            lines.append(_cell(r) + tail)
        lines.append("")
    if result["scoring"]:
        lines += [
            "## HF scoring paths",
            "",
            "Median ms per call on the activations of the first reduction layer; top-k "
            "agreement with the exact score (k = kept tokens).",
            "",
            "| dtype | shape | tokens | batch | attention | exact (lse) | exact | triton "
            "| logit proxy | proxy top-k agreement |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in result["scoring"]:

            def ms(path, r=r):
                t = r["paths"].get(path)
                return "-" if t is None else f"{1e3 * t['median_s']:.2f}"

            lines.append(
                f"| {r['dtype']} | {r['shape'][0]}x{r['shape'][1]} | {r['tokens']} | {r['batch']} "
                f"| {ms('attention')} | {ms('exact_chunked_lse')} | {ms('exact_chunked')} "
                f"| {ms('exact_triton')} | {ms('logit_proxy')} "
                f"| {r['topk_agreement']['logit_proxy']:.3f} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_speedup(result: dict, path: str) -> None:
    """Speed-up vs tokens, one line per (config, target, batch, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    series: dict = {}
    for r in result["timing"]:
        if r["config"] == result["reference"]:
            continue
        key = (r["config"], r["target"], r["batch"], r["dtype"])
        series.setdefault(key, []).append((r["tokens"], r["speedup"]))
    for (name, target, batch, dtype), pts in sorted(series.items()):
        pts.sort()
        ax.plot(
            [p[0] for p in pts],
            [p[1] for p in pts],
            marker="o",
            label=f"{name} {target} b{batch} {dtype}",
        )
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
    """Write ``benchmark.json``, ``benchmark.md`` and ``speedup.png`` under ``out_dir``.

    Returns:
        The paths written (keys ``json``, ``md``, ``png``) and the markdown.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = {
        k: osp.join(out_dir, f)
        for k, f in (("json", "benchmark.json"), ("md", "benchmark.md"), ("png", "speedup.png"))
    }
    write_json(paths["json"], result)
    markdown = to_markdown(result)
    with open(paths["md"], "w") as f:
        f.write(markdown + "\n")
    plot_speedup(result, paths["png"])
    return paths, markdown

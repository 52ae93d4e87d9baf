"""Markdown tables: one helper to write them, and the README/docs tables rendered from results/.

:func:`markdown_table` writes a table from a header and rows of cells, :func:`markdown_section`
one under a heading, :func:`fmt` a cell that may be missing; the report writers all use them.
The rest keeps every table marked ``<!-- table results/FILE.json columns=... where=... -->`` in
README.md and docs/ equal to its result file (the file's schema and the marks:
``results/README.md``). The source ``presets`` is not a file but ``fatr_seg.layers.PRESETS``,
so that the docs' table of the presets is the code's.

    python -m fatr_seg.analysis.tables            # re-render every marked table in place
    python -m fatr_seg.analysis.tables --check    # exit 1, naming them, if any differs
"""

from __future__ import annotations

import argparse
import glob
import json
import os.path as osp
import re
import sys

__all__ = ["DEFAULT_FILES", "fmt", "markdown_section", "markdown_table", "presets_result", "render",
           "render_file", "stale_tables", "update"]  # fmt: skip

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEFAULT_FILES = ("README.md", "configs/README.md", "docs/*.md", "results/README.md")
_MARK = re.compile(r"^<!-- table (\S+)((?: \w+=\S+)*) -->\n(.*?)^<!-- /table -->$", re.M | re.S)


def markdown_table(header, rows, align=None) -> str:
    """A markdown table. ``align``: one of ``"left"``/``"right"`` per column (default: the first
    column left, the others right)."""
    align = align or ["left"] + ["right"] * (len(header) - 1)
    rule = ["---:" if a == "right" else "---" for a in align]
    lines = [header, rule] + [[str(c) for c in r] for r in rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def markdown_section(title: str, header, rows, note: str = "", left: int = 1) -> list[str]:
    """Lines of a ``## title`` section: ``note`` (if any), then the table, its first ``left``
    columns left-aligned."""
    align = ["left"] * left + ["right"] * (len(header) - left)
    return [f"## {title}", ""] + ([note, ""] if note else []) + [
        markdown_table(header, rows, align)]  # fmt: skip


def fmt(value, spec: str = "", empty: str = "—") -> str:
    """A table cell: ``value`` formatted by ``spec``, or ``empty`` where it is None or NaN."""
    return empty if value is None or value != value else format(value, spec)


def _cell(row: dict, key: str, col: dict, link_base: str) -> str:
    text = None
    for fmt in [col["format"]] if isinstance(col.get("format"), str) else col.get("format", []):
        fields = re.findall(r"{(\w+)", fmt)
        if all(row.get(f) is not None for f in fields):
            text = fmt.format(**row)
            break
    if text is None:
        text = str(row[key]) if "format" not in col and row.get(key) is not None else None
    if text is None:
        return col.get("empty", "—")
    if col.get("link") and row.get(col["link"]):
        text = f"[{text}]({osp.relpath(osp.join(ROOT, row[col['link']]), link_base)})"
    bold = row.get("bold")
    if bold is True or (isinstance(bold, list) and key in bold):
        text = f"**{text}**"
    return text


def render(result: dict, columns=None, where: dict | None = None, link_base: str = ROOT) -> str:
    """The markdown table of a result file's rows (``where``: field -> value, as strings);
    links are made relative to the directory ``link_base``."""
    cols = result["columns"]
    keys = columns or list(cols)
    unknown = [k for k in keys if k not in cols]
    if unknown:
        raise ValueError(f"unknown column(s) {unknown}; the file has {list(cols)}")
    rows = [r for r in result["rows"]
            if all(str(r.get(k)) == v for k, v in (where or {}).items())]  # fmt: skip
    if not rows:
        raise ValueError(f"no row matches where={where}")
    header = [cols[k].get("label", k) for k in keys]
    align = [cols[k].get("align", "right") for k in keys]
    return markdown_table(header, [[_cell(r, k, cols[k], link_base) for k in keys] for r in rows],
                          align)  # fmt: skip


def _code(v) -> str:
    return str(v) if isinstance(v, int | float) else f"`{v!r}`"


def presets_result() -> dict:
    """``fatr_seg.layers.PRESETS`` as a result (one row per method, its keys as it sets them)."""
    from fatr_seg.layers import PRESETS

    rows = []
    for method, p in PRESETS.items():
        layers = p["layers"]
        span = len(layers) > 3 and layers == tuple(range(layers[0], layers[-1] + 1))
        keep = p.get("keep_ratio")
        keep = ", ".join(map(str, keep)) if isinstance(keep, tuple) else keep
        budget = f"keep {keep}" if "keep_ratio" in p else f"r={p['r']} per layer"
        rest = {k: v for k, v in p.items() if k not in ("layers", "keep_ratio", "r")}
        rows.append(
            dict(
                method=f"`{method}`",
                layers=f"{layers[0]} … {layers[-1]}" if span else ", ".join(map(str, layers)),
                budget=budget,
                keys=", ".join(f"{k}={_code(v)}" for k, v in rest.items()),
            )
        )
    cols = {k: {"label": k, "align": "left", "format": "{" + k + "}"}
            for k in ("method", "layers", "budget", "keys")}  # fmt: skip
    return {"columns": cols, "rows": rows}


def render_file(path: str, args: str = "", link_base: str = ROOT) -> str:
    """:func:`render` of the result file ``path`` (relative to the repository; or ``presets``)
    with the marker's arguments, e.g. ``"columns=a,b where=run=J"``."""
    opts = dict(a.split("=", 1) for a in args.split())
    where = dict(w.split("=", 1) for w in opts["where"].split(";")) if "where" in opts else None
    if path == "presets":
        result = presets_result()
    else:
        with open(osp.join(ROOT, path)) as f:
            result = json.load(f)
    columns = opts["columns"].split(",") if "columns" in opts else None
    return render(result, columns, where, link_base)


def update(md_path: str, write: bool = True) -> list[str]:
    """Re-render the marked tables of one markdown file; returns the result files of the tables
    that differed (and, with ``write``, were rewritten)."""
    with open(md_path) as f:
        text = f.read()
    stale = []

    def sub(m: re.Match) -> str:
        try:
            table = render_file(m.group(1), m.group(2), osp.dirname(osp.abspath(md_path)))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{md_path}: the table of {m.group(1)}{m.group(2)}: {e!r}") from e
        if table != m.group(3):
            stale.append(m.group(1))
        return f"<!-- table {m.group(1)}{m.group(2)} -->\n{table}<!-- /table -->"

    new = _MARK.sub(sub, text)
    if write and new != text:
        with open(md_path, "w") as f:
            f.write(new)
    return stale


def _files(patterns) -> list[str]:
    return sorted({p for pat in patterns for p in glob.glob(osp.join(ROOT, pat))})


def stale_tables(patterns=DEFAULT_FILES) -> dict[str, list[str]]:
    """Markdown file -> result files whose tables in it differ from their rendering."""
    return {p: s for p in _files(patterns) if (s := update(p, write=False))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", help=f"markdown files (default: {DEFAULT_FILES})")
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    patterns = args.files or DEFAULT_FILES
    if args.check:
        stale = stale_tables(patterns)
        for md, results in stale.items():
            print(f"{osp.relpath(md, ROOT)}: stale table(s) of {', '.join(results)}")
        return 1 if stale else 0
    for p in _files(patterns):
        for r in update(p):
            print(f"{osp.relpath(p, ROOT)}: re-rendered the table of {r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

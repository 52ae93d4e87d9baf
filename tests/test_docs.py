"""README and docs: short, current, and their result tables equal to the files in results/."""

import glob
import json
import os.path as osp
import re

import pytest

from fatr_seg.analysis import tables

ROOT = tables.ROOT
README = osp.join(ROOT, "README.md")
MARKED = re.compile(r"^<!-- table .*?^<!-- /table -->$", re.M | re.S)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def test_readme_is_short_and_installs_early():
    lines = _read(README).splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines (at most 200)"
    heading = next(i for i, line in enumerate(lines) if line.startswith("## Installation"))
    assert heading < 60, f"README's Installation starts at line {heading + 1} (within 60)"


@pytest.mark.parametrize("name", ["benchmarks.md", "study.md"])
def test_current_docs_are_short(name):
    lines = len(_read(osp.join(ROOT, "docs", name)).splitlines())
    assert lines <= 300, f"docs/{name} has {lines} lines (at most 300; dated runs: docs/history/)"


@pytest.mark.parametrize("name, pattern", [
    ("a clock time", r"\b(?:[01]?\d|2[0-3]):[0-5]\d\b"),
    ("a commit hash", r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{7,40}\b"),
    ("an absolute path", r"(?:^|[\s`(=\"'])/(?:[A-Za-z]|\.\.)"),
])  # fmt: skip
def test_readme_has_no_dev_history(name, pattern):
    text = re.sub(r"https?://\S+|<!-- /table -->", "", _read(README))
    hits = [m.group(0) for m in re.finditer(pattern, text)]
    assert not hits, f"README.md holds {name}: {hits}"


def test_readme_and_docs_tables_equal_their_result_files():
    stale = tables.stale_tables()
    assert not stale, (
        f"tables differ from their result files: {stale}; "
        "run `python -m fatr_seg.analysis.tables` and commit the markdown"
    )


def test_readme_results_tables_come_from_results():
    text = _read(README)
    sources = re.findall(r"^<!-- table (results/\S+)", text, re.M)
    assert len(sources) >= 3 and all(osp.isfile(osp.join(ROOT, s)) for s in sources)
    # Outside the generated tables, no table row holds a measured number.
    for line in MARKED.sub("", text).splitlines():
        if line.startswith("|"):
            assert not re.search(r"\d\.\d|×|%", line), f"a hand-written number in README: {line}"


def test_links_resolve():
    for md in [
        README,
        *glob.glob(osp.join(ROOT, "docs", "*.md")),
        osp.join(ROOT, "configs", "README.md"),
        osp.join(ROOT, "results", "README.md"),
    ]:
        if not osp.isfile(md):
            continue
        for target in re.findall(r"\]\(([^)\s]+)\)", _read(md)):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = osp.join(osp.dirname(md), target.split("#")[0])
            assert osp.exists(path), f"{osp.relpath(md, ROOT)} links a missing {target}"


def test_result_files_describe_themselves():
    files = sorted(glob.glob(osp.join(ROOT, "results", "*.json")))
    index = _read(osp.join(ROOT, "results", "README.md"))
    assert files
    for path in files:
        with open(path) as f:
            result = json.load(f)
        missing = {"title", "source", "date", "machine", "command", "columns", "rows"} - set(result)
        assert not missing, f"{osp.basename(path)} lacks {sorted(missing)}"
        assert "commit" in result, f"{osp.basename(path)}: say the commit, or null and why"
        assert osp.basename(path) in index, f"results/README.md does not list {path}"
        tables.render(result)  # every column renders for every row


def test_render_formats_links_and_filters(tmp_path):
    result = {
        "columns": {
            "name": {"label": "config", "align": "left", "format": "{name}", "link": "config"},
            "miou": {"label": "mIoU", "format": ["{miou:.2f} ± {std:.2f}", "{miou:.2f} (1 seed)"]},
            "x": {"label": "speed-up", "format": "{x:.2f}×", "empty": "n/a"},
        },
        "rows": [
            {"name": "a", "config": "configs/fatr_ade20k.py", "miou": 55.371, "std": 0.43, "x": 1.5,
             "run": "J", "bold": ["miou"]},
            {"name": "b", "miou": 27.33, "std": None, "run": "J"},
            {"name": "c", "miou": 1.0, "run": "K"},
        ],
    }  # fmt: skip
    table = tables.render(result, where={"run": "J"}, link_base=osp.join(ROOT, "docs"))
    assert table == (
        "| config | mIoU | speed-up |\n| --- | ---: | ---: |\n"
        "| [a](../configs/fatr_ade20k.py) | **55.37 ± 0.43** | 1.50× |\n"
        "| b | 27.33 (1 seed) | n/a |\n"
    )
    with pytest.raises(ValueError, match="unknown column"):
        tables.render(result, columns=["nope"])


def test_update_rewrites_a_marked_table_and_check_finds_it(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("text\n<!-- table presets columns=method -->\n| stale |\n<!-- /table -->\nend\n")
    assert tables.update(str(md), write=False) == ["presets"]
    assert tables.update(str(md)) == ["presets"]
    assert "`fatr`" in md.read_text() and "stale" not in md.read_text()
    assert tables.update(str(md)) == []
    assert tables.main(["--check", str(md)]) == 0


def test_presets_table_is_the_code():
    from fatr_seg.layers import PRESETS

    rows = tables.presets_result()["rows"]
    assert [r["method"] for r in rows] == [f"`{m}`" for m in PRESETS]
    fatr = rows[0]["keys"]
    for key, value in PRESETS["fatr"].items():
        if key not in ("layers", "keep_ratio", "r"):
            assert f"{key}=" in fatr and repr(value) in fatr


def test_readme_pytorch_snippet_runs():
    """The README's plain-PyTorch example, as written."""
    blocks = re.findall(r"```python\n(.*?)```", _read(README), re.S)
    snippet = next(b for b in blocks if "fatr_seg.layers import" in b)
    scope = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert tuple(scope["feature_map"].shape) == (1, 384, 32, 32)

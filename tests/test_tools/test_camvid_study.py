"""``tools/camvid_study.py``: its bookkeeping (results.json, resume, option checks), and
``--quick`` end to end on real CamVid images and the real ViT-Ti weights of the shared folder."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
from camvid_data import REAL_CAMVID, REAL_VIT_TI, REPO, SHARED, SHARED_HINT

from fatr_seg.analysis.store import Store, cached

TOOL = REPO / "tools" / "camvid_study.py"


def test_store_resumes_and_extends(tmp_path):
    path = str(tmp_path / "results.json")
    store = Store(path, {"ft_iters": 200, "seeds": [0]}, extendable=("seeds",))
    calls = []
    assert cached(store, "ft/fatr/s0", lambda: calls.append(1) or {"mIoU": 50.0}) == {"mIoU": 50.0}
    # Written at once; reopened with more seeds, the result is reused, not recomputed.
    again = Store(path, {"ft_iters": 200, "seeds": [0, 1]}, extendable=("seeds",))
    assert cached(again, "ft/fatr/s0", lambda: calls.append(2) or {"mIoU": 0.0}) == {"mIoU": 50.0}
    assert calls == [1]
    assert again.data["settings"]["seeds"] == [0, 1]
    again.put("ft/fatr/s1", {"mIoU": 51.0})
    with open(path) as f:
        assert set(json.load(f)["runs"]) == {"ft/fatr/s0", "ft/fatr/s1"}


def test_store_refuses_other_settings(tmp_path):
    path = str(tmp_path / "results.json")
    Store(path, {"ft_iters": 200, "lr": 1e-4}).put("free/none", {"mIoU": 1.0})
    with pytest.raises(ValueError, match=r"other settings \(ft_iters: 200 -> 300\)"):
        Store(path, {"ft_iters": 300, "lr": 1e-4})
    # Tuples compare as the JSON file holds them (lists).
    assert Store(path, {"ft_iters": 200, "lr": 1e-4}).get("free/none") is not None
    with open(path) as f:
        assert json.load(f)["runs"] == {"free/none": {"mIoU": 1.0}}  # nothing overwritten


def test_tome_constant_fine_tunes_with_r_scaled_to_the_crop():
    from types import SimpleNamespace

    from fatr_seg.analysis import token_schedule
    from fatr_seg.analysis.budget import ViTShape
    from fatr_seg.analysis.camvid_study import _train_reduction

    shape = ViTShape((23, 30), 192, 12, 16, 3)
    ctx = SimpleNamespace(args=SimpleNamespace(crop_size=256, scale_r=True), shape=shape)
    red = dict(method="tome_constant", r=36)
    train = _train_reduction(ctx, red)
    assert train == dict(method="tome_constant", r=13)  # 36 * 256 / 690 = 13.4
    # The same fraction of the tokens is left after the last block, in training and evaluation
    # (unscaled, 256² crops would end with 1 token).
    left = {g: token_schedule(g, 12, r)[-1].mlp - 1
            for g, r in (((16, 16), train), ((23, 30), red))}  # fmt: skip
    assert abs(left[(16, 16)] / 256 - left[(23, 30)] / 690) < 0.03
    assert token_schedule((16, 16), 12, red)[-1].mlp - 1 == 1
    for other in (None, dict(method="tome", keep_ratio=0.728)):
        assert _train_reduction(ctx, other) == other
    ctx.args.scale_r = False
    assert _train_reduction(ctx, red) == red


def run_tool(*args, env=None, timeout=1200):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def load_tool():
    """``tools/camvid_study.py`` as a module, to run its ``main`` in this process."""
    spec = importlib.util.spec_from_file_location("camvid_study_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_without_shared_folder_is_skipped_with_a_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FATR_SHARED", str(tmp_path / "nowhere"))
    load_tool().main(["--quick", "--work-dir", str(tmp_path / "work")])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(
        "skipped: --quick needs the real CamVid images and ViT-Ti weights of the shared "
        f"folder; not found: {tmp_path / 'nowhere'}/data/camvid"
    )
    assert not (tmp_path / "work").exists()


@pytest.mark.parametrize(
    "options, message",
    [
        (["--ema-momentum", "1.5"], "--ema-momentum 1.5: must lie in (0, 1)"),
        (["--ft-iters", "0"], "--ft-iters must be >= 1"),
        (["--baseline-checkpoint", "no/such.pth"], "--baseline-checkpoint not found: no/such.pth"),
        (["--data-root", "no/camvid"], "CamVid data root (--data-root) not found: no/camvid "
         "(see docs/usage.md, section 'CamVid')"),
        (["--variants", "local"], "--variants 'local': give NAME=JSON with a new name (not one "
         "of ('none', "),
        (["--variants", "tome={}"], "--variants 'tome={}': give NAME=JSON"),
        (["--variants", "a={\"layers\": [1]}", "a={}"], "--variants 'a={}': give NAME=JSON"),
        (["--variants", "a={layers"], "--variants a: Expecting property name"),
        (["--variants", 'a={"layers": [2, 3], "score": ["hf", "window_hf"]}'],
         "--variants a: reduction.score=('hf', 'window_hf') is invalid: 'window_hf' needs the "
         "unreduced grid"),
    ],
)  # fmt: skip
def test_bad_options_are_one_line_errors(tmp_path, options, message):
    argv = ["--data-root", str(tmp_path), "--work-dir", str(tmp_path / "w"), *options]
    with pytest.raises(SystemExit) as exc:
        load_tool().main(argv)
    assert str(exc.value).startswith(f"error: {message}")
    assert not (tmp_path / "w").exists()


@pytest.mark.slow
def test_missing_pretrained_weights_stop_in_one_line(tmp_path):
    """Preflight names the missing ViT-Ti file before a Runner starts: the tool's one-line exit
    (in this process; the quick test below runs the command line)."""
    from camvid_data import write_camvid

    write_camvid(tmp_path / "camvid", {"train": 2, "val": 1}, size=(360, 480))
    with pytest.raises(SystemExit) as exc:
        load_tool().main(["--data-root", str(tmp_path / "camvid"), "--pretrained",
                          str(tmp_path / "no_vit.pth"), "--work-dir", str(tmp_path / "w"),
                          "--methods", "none"])  # fmt: skip
    assert str(exc.value) == (
        f"error: pretrained checkpoint not found: {tmp_path / 'no_vit.pth'} "
        "(see docs/usage.md, section 'Pretrained weights')"
    )
    assert not list((tmp_path / "w").glob("runs/*/*.pth"))


def _quick(work, *extra):
    env = dict(__import__("os").environ, FATR_SHARED=str(SHARED), OMP_NUM_THREADS="1")
    return run_tool("--quick", "--work-dir", work, *extra, env=env)


def _quick_here(monkeypatch, work, *extra):
    """The tool's ``main`` in this process (torch and mmseg imported once), on one thread as
    :func:`_quick`; the thread count is given back after it."""
    import torch

    monkeypatch.setenv("FATR_SHARED", str(SHARED))
    threads = torch.get_num_threads()
    try:
        load_tool().main(["--quick", "--work-dir", str(work), "--threads", "1", *map(str, extra)])
    finally:
        torch.set_num_threads(threads)


def _trained(runs):
    """The training runs a study ran (a run it reused from disk records no ``train/`` entry)."""
    return {k.split("/", 1)[1] for k in runs if k.startswith("train/")}


@pytest.mark.slow
def test_quick_study_end_to_end_then_resume(tmp_path, monkeypatch):
    if not (REAL_CAMVID.is_dir() and REAL_VIT_TI.is_file()):
        pytest.skip(f"real CamVid and ViT-Ti not found under {SHARED} ({SHARED_HINT})")
    work = tmp_path / "study"
    proc = _quick(work)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((work / "results.json").read_text())
    st, runs = data["settings"], data["runs"]
    methods = ["none", "fatr", "tome"]
    assert st["methods"] == methods and st["seeds"] == [0]

    # Equal MACs: ToMe's ratio was raised to FATR's cost; the counter agrees with the closed form.
    budget = {m: runs[f"budget/{m}"] for m in methods}
    assert budget["tome"]["reduction"]["keep_ratio"] > 0.7
    assert abs(budget["tome"]["macs"] / budget["fatr"]["macs"] - 1) <= 0.01
    cost = runs["cost"]
    for m in methods:
        assert cost["macs"][m]["backbone"] == budget[m]["macs"]
        assert cost["macs"][m]["segmentor"] > cost["macs"][m]["backbone"]
        for b in ("b1", "b2"):
            assert cost["images_per_s"][b][m]["median"] > 0
    assert cost["macs"]["fatr"]["backbone"] < 0.7 * cost["macs"]["none"]["backbone"]

    for key in ["free/" + m for m in methods] + [f"ft/{m}/s0" for m in methods]:
        r = runs[key]
        assert r["images"] == 2 and len(r["IoU"]) == 11 and 0 <= r["mIoU"] <= 100
        assert r["mIoU"] == pytest.approx(
            sum(v for v in r["IoU"] if v is not None) / sum(v is not None for v in r["IoU"])
        )
    # Training-free, nothing changes before the first reduction (block 4).
    for phase in ("free", "ft"):
        for m in methods:
            hf = runs[f"hf/{phase}/{m}"]
            assert len(hf["hf_restored"]) == 12 and all(0 < v <= 1 for v in hf["hf_tokens"])
    ref = runs["hf/free/none"]
    for m in ("fatr", "tome"):
        for key in ("hf_restored", "hf_tokens"):
            assert runs[f"hf/free/{m}"][key][:3] == pytest.approx(ref[key][:3], rel=1e-5)
        assert runs[f"hf/free/{m}"]["num_tokens"][3] < ref["num_tokens"][3] == 690

    # Trained: the baseline and each method's fine-tuning.
    assert _trained(runs) == {"baseline_s0"} | {f"ft_{m}_s0" for m in methods}
    for name in _trained(runs):
        assert runs[f"train/{name}"]["s_per_iter"] > 0
    table = (work / "table.md").read_text()
    for m in methods:
        assert f"| {m} |" in table
    assert "Bicyclist" in table
    for png in ("miou.png", "per_class.png", "hf_amplitude.png"):
        assert (work / png).stat().st_size > 5000

    # A re-run (in this process: the command line ran above) with one more seed trains only
    # that seed's fine-tunings and keeps the rest.
    _quick_here(monkeypatch, work, "--seeds", "0", "1", "--finetune-as", "both")
    new = json.loads((work / "results.json").read_text())
    assert _trained(new["runs"]) - _trained(runs) == {f"ft_{m}_s1" for m in methods}
    assert {k: v for k, v in new["runs"].items() if k in runs} == runs
    assert all(f"ft/{m}/s1" in new["runs"] for m in methods)
    text = (work / "table.md").read_text()
    assert "(n=2)" in text
    # --finetune-as both: every method also on none's fine-tuned weights, no extra training.
    assert {k for k in new["runs"] if k.startswith("deploy/")} == {
        f"deploy/{m}/s{s}" for m in ("fatr", "tome") for s in (0, 1)
    }
    assert "mIoU on none's fine-tuning" in text

    # Other settings on the same folder: refused in one line, naming the change; nothing
    # overwritten (the tool's way out for every error, as a user sees it in the bad-options test).
    with pytest.raises(SystemExit) as other:
        _quick_here(monkeypatch, work, "--ft-iters", "3")
    assert str(other.value).startswith("error: ") and "\n" not in str(other.value)
    assert "other settings (ft_iters: 2 -> 3)" in str(other.value)
    assert json.loads((work / "results.json").read_text()) == new
    assert not math.isnan(new["runs"]["ft/none/s1"]["mIoU"])


def test_cost_is_kept_for_fewer_methods_and_measured_again_for_more():
    """Methods are timed together: adding one times them all again; a re-run over a subset (more
    seeds of two methods) keeps the stored timings of all."""
    from types import SimpleNamespace

    from fatr_seg.analysis.camvid_study import _cost_stale

    stored = {"cost": {"models": ["none", "fatr", "tome"]}}
    ctx = SimpleNamespace(store=SimpleNamespace(get=stored.get))
    assert not _cost_stale(ctx, "cost", ["fatr", "none"])
    assert not _cost_stale(ctx, "cost", ["none", "fatr", "tome"])
    assert _cost_stale(ctx, "cost", ["none", "fatr", "algm"])
    assert _cost_stale(SimpleNamespace(store=SimpleNamespace(get={}.get)), "cost", ["none"])


def test_mean_and_std_cells_of_the_reports():
    """One seed is shown as its value (no '± 0.00' that would read as a measured spread); more
    seeds as mean ± sample standard deviation."""
    import statistics

    from fatr_seg.analysis.camvid_report import pm

    assert pm([55.809], 2) == "55.81"
    vals = [57.49, 56.45, 56.06]
    want = f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"
    assert pm(vals, 2) == want == "56.67 ± 0.74"
    assert pm([]) == "n/a"


def test_paired_difference_and_its_standard_error():
    """Δ is the mean of per-seed differences against `none` with the same seed (a seed that one
    of the two lacks is left out), ± the standard error of those differences."""
    from fatr_seg.analysis.camvid_report import _delta_text, paired_delta

    runs = {"ft/none/s0": {"mIoU": 50.0}, "ft/none/s1": {"mIoU": 52.0},
            "ft/none/s2": {"mIoU": 51.0}, "deploy/x/s0": {"mIoU": 49.0},
            "deploy/x/s1": {"mIoU": 52.5}, "deploy/x/s3": {"mIoU": 10.0},
            "ft/x/s2": {"mIoU": 50.0}}  # fmt: skip
    mean, se, n = paired_delta(runs, [0, 1, 2, 3], "x", "deploy")
    assert n == 2 and mean == pytest.approx(-0.25) and se == pytest.approx(0.75)
    assert _delta_text(runs, [0, 1, 2, 3], "x", "deploy") == "-0.25 ± 0.75"
    assert _delta_text(runs, [0, 1, 2], "x") == "-1.00"  # one pair: no spread to show
    assert _delta_text(runs, [0, 1], "x") == "n/a"

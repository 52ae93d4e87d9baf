"""``tools/train.py`` stops in one line, naming the data root, when the data is missing.

Training and testing through the tools (a checkpoint, one logged loss per iteration, an mIoU and
mmseg's per-class table) are checked end to end by ``test_demo.py::test_quick_demo_end_to_end``,
which runs both tools on the demo's configs; the resume, distributed-test, distillation and
CamVid runs are in their own files.
"""

import pytest
from tiny_configs import REPO, loader_options, run_tool

DEMO_CONFIG = REPO / "configs" / "demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py"


@pytest.mark.slow
def test_train_missing_data_root_is_one_line(tmp_path):
    missing = tmp_path / "no_such_data"
    proc = run_tool(["tools/train.py", DEMO_CONFIG, "--work-dir", tmp_path / "work",
                     "--cfg-options", *loader_options(missing)])  # fmt: skip
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert err and str(missing) in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "work").exists() or not list((tmp_path / "work").rglob("*.pth"))

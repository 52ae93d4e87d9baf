"""``end_distributed_rank``: a finished rank of a distributed run leaves through ``os._exit(0)``
after destroying its process group and flushing its logs; outside a distributed run it does
nothing. (Left to the interpreter's exit, a gloo rank of ``tools/dist_test.sh`` aborted in about
one run in four; ``tests/test_tools/test_train_resume_dist_test.py`` runs the real tools.)
"""

import subprocess
import sys
import textwrap

from fatr_seg.models.runner import end_distributed_rank

SCRIPT = textwrap.dedent("""
    import atexit, logging, os, sys, tempfile
    import torch.distributed as dist
    from fatr_seg.models.runner import end_distributed_rank

    log = os.path.join(sys.argv[1], "rank.log")
    logging.basicConfig(filename=log, level=logging.INFO)
    store = dist.FileStore(os.path.join(sys.argv[1], "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    atexit.register(lambda: print("atexit ran"))
    logging.info("results written")
    print("before the end", flush=False)
    end_distributed_rank()
    print("after the end")
""")


def test_outside_a_distributed_run_it_returns():
    assert end_distributed_rank() is None


def test_a_rank_leaves_with_its_logs_flushed(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == "before the end\n"  # flushed; nothing after it ran, no atexit
    assert "results written" in (tmp_path / "rank.log").read_text()

"""Shared test setup.

* Makes ``tests/reference.py`` (the naive reference implementation) importable.
* ``single_thread``: runs a module's many tiny tensor ops on one intra-op thread. On a small or
  busy machine, OpenMP threads waiting on each other make such ops 10x slower; one thread also
  makes GEMM rounding independent of the thread count.
* Every test starts in mmseg's default registry scope, and leaves behind no scope it created: a
  Runner in one test sets mmengine's global default scope, and mmseg modules built later (heads
  build their losses through that scope) then failed depending on the test order.
"""

import sys
from pathlib import Path

import pytest
import torch

TESTS_DIR = str(Path(__file__).resolve().parent)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def mmseg_default_scope():
    try:
        from mmengine.registry import DefaultScope
    except ImportError:  # the pure-torch tests do not need mmengine
        yield
        return
    with DefaultScope.overwrite_default_scope("mmseg"):
        yield

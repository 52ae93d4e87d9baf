"""Let torch >= 2.6 load mmengine 0.10.7 checkpoints with ``weights_only=True`` still on.

torch 2.6 changed ``torch.load``'s default to ``weights_only=True``. mmengine 0.10.7 calls
``torch.load(filename, map_location=...)`` without the argument (``load_from_local``), so
``Runner.resume`` fails: a Runner checkpoint holds more than tensors. Saving a Runner checkpoint
and listing its globals (``torch.serialization.get_unsafe_globals_in_checkpoint``) gives:

* ``mmengine.logging.history_buffer.HistoryBuffer``: the message hub's logged scalars;
* ``numpy._core.multiarray._reconstruct``, ``numpy.ndarray``, ``numpy.dtype`` and the dtype
  classes: the buffers' arrays;
* ``numpy._core.multiarray.scalar``: numpy scalars such as ``runtime_info['eta']``;
* ``builtins.getattr``: ``HistoryBuffer.__getstate__`` stores its statistics methods
  (``HistoryBuffer.min`` ...), and pickle protocol 2 (``torch.save``'s) writes a method whose
  qualified name has a dot as ``getattr(HistoryBuffer, 'min')``.

We allow-list exactly these. ``getattr`` itself would let a checkpoint reach any attribute of any
allowed object, so it is replaced by ``_history_buffer_method``, which only returns plain methods
of ``HistoryBuffer``. Everything else still goes through torch's restricted unpickler. The numpy
names are registered under both the numpy 2 (``numpy._core``) and numpy 1 (``numpy.core``) module
paths, because checkpoints carry the path of the numpy that saved them.

Nothing is registered on import: the allow-list is torch's process-wide state, so it is installed
only where asked for, by :func:`allow_mmengine_checkpoints` (``tools/train.py``, ``tools/test.py``
and ``tools/visualize_tokens.py`` call it) or by :class:`AllowMMEngineCheckpointsHook`, a hook a
config lists in ``custom_hooks`` (our configs do), which installs it before the Runner loads or
resumes a checkpoint.
"""

import inspect
import pickle

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.logging import HistoryBuffer
from mmseg.registry import HOOKS

__all__ = ["AllowMMEngineCheckpointsHook", "allow_mmengine_checkpoints", "mmengine_safe_globals"]

_multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray

# Numeric and bool dtypes only: the classes numpy arrays of logged scalars can have.
_DTYPE_CLASSES = [type(np.dtype(code)) for code in "?bBhHiIlLqQefdgFDG"]


def _history_buffer_method(owner, name):
    """``getattr`` restricted to what pickle writes for ``HistoryBuffer.<method>``."""
    if owner is HistoryBuffer and not name.startswith("_"):
        method = vars(HistoryBuffer).get(name)
        if inspect.isfunction(method):
            return method
    raise pickle.UnpicklingError(
        f"checkpoint asks for getattr({owner!r}, {name!r}); only public HistoryBuffer methods "
        "are allowed (fatr_seg.models.safe_globals)"
    )


def mmengine_safe_globals():
    """The ``(object, pickled name)`` pairs mmengine Runner checkpoints need."""
    pairs = [
        (HistoryBuffer, "mmengine.logging.history_buffer.HistoryBuffer"),
        (_history_buffer_method, "builtins.getattr"),
        (np.ndarray, "numpy.ndarray"),
        (np.dtype, "numpy.dtype"),
    ]
    for module in ("numpy._core.multiarray", "numpy.core.multiarray"):
        pairs += [
            (_multiarray._reconstruct, f"{module}._reconstruct"),
            (_multiarray.scalar, f"{module}.scalar"),
        ]
    # dtype classes are only checked by identity (BUILD on a dtype), never looked up by name.
    pairs += [(cls, f"{cls.__module__}.{cls.__qualname__}") for cls in _DTYPE_CLASSES]
    return pairs


def allow_mmengine_checkpoints() -> None:
    """Register :func:`mmengine_safe_globals` with torch's ``weights_only`` unpickler.

    Process-wide and idempotent. Call it before mmengine loads a Runner checkpoint
    (``Runner.resume``, ``load_from``, ``mmseg.apis.init_model``).
    """
    torch.serialization.add_safe_globals(mmengine_safe_globals())


@HOOKS.register_module()
class AllowMMEngineCheckpointsHook(Hook):
    """Calls :func:`allow_mmengine_checkpoints` when the Runner starts.

    ``before_run`` comes before the Runner loads ``load_from`` or resumes, in ``train``, ``val``
    and ``test`` alike. List it in a config to resume with any tool, mmseg's own included::

        custom_hooks = [dict(type='AllowMMEngineCheckpointsHook')]
    """

    priority = "VERY_HIGH"

    def before_run(self, runner) -> None:
        allow_mmengine_checkpoints()

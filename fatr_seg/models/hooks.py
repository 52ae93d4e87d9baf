"""``UnreducedCheckpointHook``: a FATR segmentor loads its unreduced model's checkpoint cleanly.

A FATR model is its unreduced ViT plus a few parameters of its own (``attn.omega1``,
``attn.omega2``, ``reducer.dc_pos``) whose init makes each block compute what the unreduced block
computes on the tokens it is given. So the checkpoint of the trained unreduced segmentor is a
complete FATR model, the training-free one: the config with the reduction and the unreduced
checkpoint, e.g.
``tools/test.py configs/demo/fatr_vit-t_fcn_1xb8-200_synthetic-192x192.py BASELINE.pth``.
mmengine loads ``load_from`` non-strictly and warns about every missing key; this hook fills in
those parameters first (:func:`~fatr_seg.models.convert.fill_reduction_params`, which acts only when
nothing else is missing) and says so in one line.

:func:`fatr_seg.models.runner.build_runner` (``tools/train.py``, ``tools/test.py``) registers
it on every Runner; other tools get it from a config::

    custom_hooks = [dict(type='UnreducedCheckpointHook')]
"""

from __future__ import annotations

import re

from mmengine.hooks import Hook
from mmengine.logging import print_log
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS

from .convert import fill_reduction_params

__all__ = ["UnreducedCheckpointHook", "describe_keys"]


def describe_keys(keys: list[str]) -> str:
    """State-dict keys in short: ``backbone.blocks.{4..11}.attn.omega1`` for one name in a run
    of blocks (the keys' own 0-indexed block numbers), other keys as they are."""
    groups: dict[tuple[str, str], list[int]] = {}
    for key in keys:
        m = re.match(r"(.*\bblocks\.)(\d+)(\..+)$", key)
        head, num, tail = (m.group(1), int(m.group(2)), m.group(3)) if m else (key, None, "")
        groups.setdefault((head, tail), []).extend([] if num is None else [num])
    parts = []
    for (head, tail), nums in groups.items():
        nums = sorted(set(nums))
        if len(nums) > 1 and nums == list(range(nums[0], nums[-1] + 1)):
            parts.append(f"{head}{{{nums[0]}..{nums[-1]}}}{tail}")
        elif nums:
            parts.append(f"{head}{{{','.join(map(str, nums))}}}{tail}" if len(nums) > 1
                         else f"{head}{nums[0]}{tail}")  # fmt: skip
        else:
            parts.append(head)
    return ", ".join(parts)


@HOOKS.register_module()
class UnreducedCheckpointHook(Hook):
    """Completes an unreduced model's checkpoint with the reduction's own parameters on loading.

    ``after_load_checkpoint`` runs after the Runner reads a checkpoint (``load_from`` or a
    resume) and before it loads it into the model. A checkpoint that lacks exactly the
    reduction's own parameters gets the model's values of them (their identity init) and one
    log line instead of mmengine's mismatch warning; any other checkpoint is left to mmengine.
    """

    priority = "VERY_HIGH"

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        state = checkpoint.get("state_dict", checkpoint)
        prefix = "module." if state and all(k.startswith("module.") for k in state) else ""
        added = fill_reduction_params(model.state_dict(), state, prefix)
        if added:
            print_log(
                f"the checkpoint is the unreduced model's: the reduction's own parameters "
                f"({describe_keys(added)}) are not in it and keep their identity init",
                logger="current",
            )

"""``torch.compile`` for inference: the segmentor's modules, and the hook that does it in tests.

The backbone (every reduction preset, and ``reduction=None``) and the decode heads compile as
one graph each, with no graph break (``tests/test_layers/test_compile_layers.py``,
``tests/test_models/test_compile.py``): token budgets come from shapes, the key biases from the
state's structure, and nothing reads a tensor value on the host.

Compilation replaces a module's ``forward`` by a compiled one on the instance, so parameters,
state-dict keys and checkpoints are untouched, and deleting the attribute restores eager mode.
Shapes are static by default (``dynamic=False``): slide inference feeds every crop at the same
size, so one graph per module serves a whole test set; whole-image inference on images of many
sizes recompiles per size until torch's recompile limit, then runs eagerly.
"""

from __future__ import annotations

from typing import Any

import torch
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmseg.registry import HOOKS

__all__ = [
    "COMPILE_TARGETS",
    "CompileInferenceHook",
    "add_compile_hook",
    "compile_modules",
    "restore_eager",
]

#: Submodules of an mmseg segmentor that :func:`compile_modules` compiles by default.
COMPILE_TARGETS = ("backbone", "neck", "decode_head")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if is_model_wrapper(model) else model


def compile_modules(
    model: torch.nn.Module,
    targets: tuple[str, ...] = COMPILE_TARGETS,
    **options: Any,
) -> list[str]:
    """Compile the ``forward`` of the segmentor's ``targets`` submodules in place.

    Args:
        model: An mmseg segmentor (or a model wrapper holding one).
        targets: Attribute names of the submodules to compile; those the model lacks (a
            segmentor without a neck) are skipped.
        **options: ``torch.compile`` options; ``dynamic`` defaults to False.

    Returns:
        The names of the submodules compiled.

    Raises:
        ValueError: A target that is neither a submodule nor absent.
    """
    options.setdefault("dynamic", False)
    make = lambda name, module: torch.compile(module.forward, **options)  # noqa: E731
    return _replace_forwards(model, targets, "compile", make)


def _replace_forwards(model: torch.nn.Module, targets: tuple[str, ...], what: str, make
                      ) -> list[str]:  # fmt: skip
    """Set ``module.forward = make(name, module)`` on the segmentor's ``targets`` whose forward
    is still the class's (a compiled or graphed one is kept); absent targets are skipped."""
    model = _unwrap(model)
    done = []
    for name in targets:
        module = getattr(model, name, None)
        if module is None:
            continue
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"{what} target {name!r} of {type(model).__name__} is no module")
        if "forward" not in vars(module):
            module.forward = make(name, module)
        done.append(name)
    return done


def restore_eager(model: torch.nn.Module, targets: tuple[str, ...] = COMPILE_TARGETS) -> None:
    """Undo :func:`compile_modules`: the submodules run their class's eager ``forward`` again."""
    model = _unwrap(model)
    for name in targets:
        module = getattr(model, name, None)
        if isinstance(module, torch.nn.Module) and "forward" in vars(module):
            del module.forward


@HOOKS.register_module()
class CompileInferenceHook(Hook):
    """Run validation and testing through ``torch.compile``d modules; training stays eager.

    Add it to a config as ``custom_hooks = [dict(type='CompileInferenceHook')]``
    (``tools/test.py --compile`` does this). Before each validation or test run the segmentor's
    ``targets`` are compiled (:func:`compile_modules`); after a validation run they are eager
    again, so the training step is not traced. Compiled graphs are kept between validations.

    Args:
        targets: Submodules to compile (default: backbone, neck and decode head).
        fullgraph: Fail on a graph break instead of splitting the graph.
        dynamic: ``torch.compile``'s ``dynamic`` (default False: one graph per input size).
        backend: ``torch.compile`` backend.
        mode: ``torch.compile`` mode (e.g. ``'max-autotune'``).
    """

    priority = "VERY_LOW"

    def __init__(
        self,
        targets: tuple[str, ...] = COMPILE_TARGETS,
        fullgraph: bool = False,
        dynamic: bool | None = False,
        backend: str = "inductor",
        mode: str | None = None,
    ) -> None:
        self.targets = tuple(targets)
        self.options = dict(fullgraph=fullgraph, dynamic=dynamic, backend=backend, mode=mode)
        self._compiled: dict[str, Any] = {}

    def _compile(self, runner) -> None:
        model = _unwrap(runner.model)
        for name in self.targets:
            module = getattr(model, name, None)
            if module is None:
                continue
            if name in self._compiled:
                module.forward = self._compiled[name]
            else:
                compile_modules(model, (name,), **self.options)
                self._compiled[name] = module.forward
        runner.logger.info(f"CompileInferenceHook: compiled {sorted(self._compiled)}")

    def before_val(self, runner) -> None:
        self._compile(runner)

    def after_val(self, runner) -> None:
        restore_eager(runner.model, self.targets)

    def before_test(self, runner) -> None:
        self._compile(runner)

    def after_test(self, runner) -> None:
        restore_eager(runner.model, self.targets)


def add_compile_hook(cfg, **options: Any) -> None:
    """Add :class:`CompileInferenceHook` (with ``options``) to an mmengine config's
    ``custom_hooks``, unless the config already has one (``tools/test.py --compile``)."""
    hooks = list(cfg.get("custom_hooks") or [])
    if not any(h.get("type") in ("CompileInferenceHook", CompileInferenceHook) for h in hooks):
        hooks.append(dict(type="CompileInferenceHook", **options))
    cfg.custom_hooks = hooks

"""CUDA graphs for inference: the eager forward captured once per input shape and replayed.

The GPU path the tools take by default (``tools/test.py`` through :class:`CUDAGraphInferenceHook`,
``tools/benchmark.py`` and :class:`fatr_seg.models.inferencer.FATRInferencer` through
:func:`graph_for_inference`): one implementation, :class:`CUDAGraphForward`, installed on the
segmentor's modules so that parameters and checkpoints are untouched.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from mmengine.hooks import Hook
from mmseg.registry import HOOKS

from ..layers.attention import ReweightedCore
from .compile import (
    COMPILE_TARGETS,
    CompileInferenceHook,
    _replace_forwards,
    _unwrap,
    restore_eager,
)

__all__ = [
    "CUDAGraphForward",
    "CUDAGraphInferenceHook",
    "add_cuda_graph_hook",
    "capture_cuda_graph",
    "cuda_graph_modules",
    "graph_for_inference",
]


# ----------------------------------------------------------------------------------------------
def _leaves(tree: Any) -> list[torch.Tensor]:
    """The tensors of nested tuples, lists, dicts and dataclasses (e.g. ``CompactTokens``)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, list | tuple):
        return [t for item in tree for t in _leaves(item)]
    if isinstance(tree, dict):
        return [t for item in tree.values() for t in _leaves(item)]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return [t for f in dataclasses.fields(tree) for t in _leaves(getattr(tree, f.name))]
    return []


def _map(tree: Any, fn) -> Any:
    """``tree`` with every tensor replaced by ``fn(tensor)``, same structure."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, list | tuple):
        items = [_map(item, fn) for item in tree]
        return type(tree)(*items) if hasattr(tree, "_fields") else type(tree)(items)
    if isinstance(tree, dict):
        return type(tree)((k, _map(v, fn)) for k, v in tree.items())
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        changes = {f.name: _map(getattr(tree, f.name), fn) for f in dataclasses.fields(tree)
                   if f.init}  # fmt: skip
        return dataclasses.replace(tree, **changes)
    return tree


def _signature(tree: Any) -> Any:
    """What a captured graph is valid for: the structure, and every tensor's shape, dtype,
    device and strides; plus the autocast state (a graph replays the kernels it captured)."""
    if isinstance(tree, torch.Tensor):
        return ("T", tuple(tree.shape), tree.dtype, str(tree.device), tree.stride())
    if isinstance(tree, list | tuple):
        return (type(tree).__name__, tuple(_signature(item) for item in tree))
    if isinstance(tree, dict):
        return ("dict", tuple((k, _signature(v)) for k, v in tree.items()))
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return (
            type(tree).__name__,
            tuple((f.name, _signature(getattr(tree, f.name))) for f in dataclasses.fields(tree)),
        )
    return ("V", repr(tree))


def capture_cuda_graph(fn, args: tuple, pool=None):
    """Capture ``fn(*args)`` in a CUDA graph; returns ``replay(new_args) -> outputs``.

    The inputs are copied into static buffers before every replay; the outputs of a replay are
    copies (the graph's own are overwritten by the next replay). Two warm-up calls run on a side
    stream first (lazy initialisation, kernel choices, autotuning), as ``torch.cuda.graph``
    requires.
    """
    device = _leaves(args)[0].device
    static = _map(args, lambda t: t.clone())
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*static)
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn(*static)

    def replay(new_args: tuple):
        for dst, src in zip(_leaves(static), _leaves(new_args), strict=True):
            dst.copy_(src)
        graph.replay()
        return _map(out, lambda t: t.clone())

    return replay


class CUDAGraphForward:
    """A module's ``forward`` replayed from CUDA graphs, one per input signature.

    Installed on the instance (``module.forward = CUDAGraphForward(module)``, see
    :func:`cuda_graph_modules`), so parameters and checkpoints are untouched. A call is graphed
    when the module is in eval mode, autograd is off and every input tensor is on CUDA with
    keyword-free arguments; the first call of a new input signature (shapes, dtypes, strides,
    autocast) captures a graph, later ones replay it, which launches the eager forward's
    kernels without its host work. Token budgets come from shapes and nothing reads a tensor
    value on the host (tests/test_layers/test_host_sync.py), so the reduced backbone captures.

    It falls back to eager, saying so in one line (``log``) once per cause, where shapes vary
    (more than ``max_graphs`` signatures: new ones run eager) or a capture fails (the module
    then runs eager from there on). Other calls (CPU, training) run eager silently.

    Args:
        module: The module.
        max_graphs: Signatures captured at most (each graph holds its own activations).
        name: Its name in the messages.
        log: Where the one-line messages go.
        capture: The capture function (:func:`capture_cuda_graph`; tests give another).
        device_type: The inputs' device type that is graphed (tests give ``'cpu'``).
    """

    def __init__(
        self, module: torch.nn.Module, max_graphs: int = 8, name: str | None = None, log=print,
        capture=capture_cuda_graph, device_type: str = "cuda",
    ) -> None:  # fmt: skip
        self.module = module
        self.eager = module.forward
        self.max_graphs = max_graphs
        self.name = name or type(module).__name__
        self.log = log
        self.capture = capture
        self.device_type = device_type
        self.graphs: dict = {}
        self.failed: str | None = None
        self._said: set[str] = set()
        self._pool = None
        # Whether each block skips its identity reweighting is host state the graph bakes in.
        self._reweighting = [
            m for m in module.modules() if isinstance(m, ReweightedCore) and m.reweight is not None
        ]

    def _say(self, cause: str, text: str) -> None:
        if cause not in self._said:
            self._said.add(cause)
            self.log(f"CUDA graph: {self.name} runs eager ({text})")

    def graphable(self, args: tuple, kwargs: dict) -> bool:
        leaves = _leaves(args)
        return (
            not kwargs
            and bool(leaves)
            and all(t.device.type == self.device_type for t in leaves)
            and not self.module.training
            and not torch.is_grad_enabled()
            and self.failed is None
        )

    def __call__(self, *args, **kwargs):
        if not self.graphable(args, kwargs):
            return self.eager(*args, **kwargs)
        autocast = tuple((d, torch.is_autocast_enabled(d), torch.get_autocast_dtype(d))
                         for d in ("cuda",))  # fmt: skip
        key = (_signature(args), autocast, tuple(m.hp_is_identity() for m in self._reweighting))
        replay = self.graphs.get(key)
        if replay is None:
            if len(self.graphs) >= self.max_graphs:
                self._say("shapes", f"input shapes vary: more than {self.max_graphs} captured")
                return self.eager(*args)
            try:
                if self._pool is None and self.device_type == "cuda":
                    self._pool = torch.cuda.graph_pool_handle()
                replay = self.capture(self.eager, args, self._pool)
            except Exception as err:  # noqa: BLE001 - any capture failure falls back to eager
                self.failed = f"capture failed: {type(err).__name__}: {str(err).splitlines()[0]}"
                self._say("failed", self.failed)
                return self.eager(*args)
            self.graphs[key] = replay
        return replay(args)


def cuda_graph_modules(
    model: torch.nn.Module,
    targets: tuple[str, ...] = COMPILE_TARGETS,
    log=print,
    **options: Any,
) -> list[str]:
    """Run the segmentor's ``targets`` submodules from CUDA graphs (:class:`CUDAGraphForward`).

    A module whose ``forward`` is already replaced (compiled, or graphed) is left as it is.
    :func:`restore_eager` undoes it. Returns the names of the submodules graphed.
    """
    return _replace_forwards(model, targets, "CUDA graph", lambda name, module: CUDAGraphForward(
        module, name=name, log=log, **options))  # fmt: skip


def graph_for_inference(model: torch.nn.Module, log=print, **options: Any) -> list[str]:
    """The GPU path that the tools and :class:`fatr_seg.models.FATRInferencer` take by default:
    :func:`cuda_graph_modules` when the model is on the graphed device (CUDA; ``device_type``
    in ``options`` for tests), nothing elsewhere. Returns the names of the submodules graphed."""
    device = _model_device(model)
    if device is None or device.type != options.get("device_type", "cuda"):
        return []
    return cuda_graph_modules(model, log=log, **options)


def _model_device(model: torch.nn.Module) -> torch.device | None:
    param = next(_unwrap(model).parameters(), None)
    return None if param is None else param.device


@HOOKS.register_module()
class CUDAGraphInferenceHook(Hook):
    """Run validation and testing from CUDA graphs (issue 24: the GPU path by default).

    ``tools/test.py`` adds it on a CUDA machine (``--no-cuda-graph`` leaves it out). Before each
    validation or test run on CUDA the segmentor's ``targets`` are graphed
    (:func:`cuda_graph_modules`); after it they are eager again, so training is untouched. On
    CPU it says so in one line and does nothing.

    Args:
        targets: Submodules to graph (default: backbone, neck and decode head).
        max_graphs: Input signatures captured per module before new ones run eager.
    """

    priority = "VERY_LOW"

    def __init__(self, targets: tuple[str, ...] = COMPILE_TARGETS, max_graphs: int = 8) -> None:
        self.targets = tuple(targets)
        self.max_graphs = max_graphs
        self._graphed: dict[str, CUDAGraphForward] = {}

    def _install(self, runner) -> None:
        device = _model_device(runner.model)
        if device is None or device.type != "cuda":
            runner.logger.info(f"CUDAGraphInferenceHook: the model is on {device}: eager")
            return
        model = _unwrap(runner.model)
        for name in self.targets:
            module = getattr(model, name, None)
            if module is None or "forward" in vars(module) and name not in self._graphed:
                continue
            if name not in self._graphed:
                cuda_graph_modules(model, (name,), log=runner.logger.info,
                                   max_graphs=self.max_graphs)  # fmt: skip
                self._graphed[name] = module.forward
            module.forward = self._graphed[name]
        runner.logger.info(f"CUDAGraphInferenceHook: CUDA graphs for {sorted(self._graphed)}")

    def before_val(self, runner) -> None:
        self._install(runner)

    def after_val(self, runner) -> None:
        restore_eager(runner.model, tuple(self._graphed))

    def before_test(self, runner) -> None:
        self._install(runner)

    def after_test(self, runner) -> None:
        restore_eager(runner.model, tuple(self._graphed))


def add_cuda_graph_hook(cfg, **options: Any) -> None:
    """Add :class:`CUDAGraphInferenceHook` to an mmengine config's ``custom_hooks``, unless the
    config already has one or compiles (``CompileInferenceHook`` owns the forward then)."""
    hooks = list(cfg.get("custom_hooks") or [])
    owners = ("CUDAGraphInferenceHook", CUDAGraphInferenceHook, "CompileInferenceHook",
              CompileInferenceHook)  # fmt: skip
    if not any(h.get("type") in owners for h in hooks):
        hooks.append(dict(type="CUDAGraphInferenceHook", **options))
    cfg.custom_hooks = hooks

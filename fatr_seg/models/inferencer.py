"""mmseg's inferencer on the GPU path by default: the segmentor's modules from CUDA graphs.

``FATRInferencer(config, checkpoint)`` is mmseg's ``MMSegInferencer`` (same arguments, same
call, same results) whose backbone, neck and decode head run from CUDA graphs on CUDA
(:func:`fatr_seg.models.cuda_graph.graph_for_inference`: one graph per input shape; eager, with
a one-line message, where shapes vary or a capture fails). ``cuda_graph=False`` runs eager; on
CPU it is eager anyway. Not imported by :mod:`fatr_seg.models` (``mmseg.apis`` is a heavy
import): ``from fatr_seg.models.inferencer import FATRInferencer``.
"""

from __future__ import annotations

from mmseg.apis import MMSegInferencer

from .cuda_graph import graph_for_inference
from .safe_globals import allow_mmengine_checkpoints

__all__ = ["FATRInferencer"]


class FATRInferencer(MMSegInferencer):
    """``MMSegInferencer`` whose segmentor runs from CUDA graphs on CUDA.

    Args:
        *args, **kwargs: ``MMSegInferencer``'s (``model``, ``weights``, ``classes``,
            ``palette``, ``dataset_name``, ``device``, ``scope``).
        cuda_graph: Run the backbone, neck and decode head from CUDA graphs on CUDA (False:
            eager).
        log: Where the one-line fallback messages go.
        graph_options: More options of :class:`fatr_seg.models.cuda_graph.CUDAGraphForward`
            (``max_graphs``, ``targets``; tests give ``capture`` and ``device_type``).

    Attributes:
        graphed: The submodules that run from CUDA graphs (empty when eager).
    """

    def __init__(self, *args, cuda_graph: bool = True, log=print, graph_options: dict | None = None,
                 **kwargs) -> None:  # fmt: skip
        if not isinstance(cuda_graph, bool):
            raise ValueError(f"cuda_graph must be True or False, got {cuda_graph!r}")
        allow_mmengine_checkpoints()  # the checkpoint is read with torch.load(weights_only=True)
        super().__init__(*args, **kwargs)
        options = dict(graph_options or {})
        self.graphed = graph_for_inference(self.model, log=log, **options) if cuda_graph else []

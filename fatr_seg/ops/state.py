"""The explicit state that travels with the token sequence through a reduced ViT."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

__all__ = ["TokenState", "init_state", "is_initial"]


@dataclass(frozen=True)
class TokenState:
    """Where every original patch lives in the current token sequence.

    The sequence is ``[CLS, HF patch tokens (M), DC tokens (D)]``, shape (B, 1 + M + D, C).
    Positions below are indices into ``x[:, 1:]`` (the sequence without CLS).

    Attributes:
        hw_shape: Original patch grid (H, W); ``N = H · W``.
        source: (B, N) long. For each original patch, the position of the token that represents it
            now: itself while it is an HF token, its DC token once it was folded.
        patch_idx: (B, M) long. Original-grid index of each HF token (ascending for FATR; for
            a merged ToMe token, the index of the token it was merged into).
        dc_count: (B, D) float32. Number of original patches folded into each DC token.
        dc_grid: The DC windows of the current DC tokens, ``('side', w)`` or ``('size', s)``
            (see :func:`fatr_seg.ops.dc_window_ids`); None while there are none.
        residual: (B, N, C) or None. Per original patch, what its representative lacks to give
            back the patch's own token (see :func:`fatr_seg.ops.accumulate_residual`); zero for
            patches that were never aggregated. Kept only for ``restore='residual'``.
        patch_size: (B, M) float32 or None. Number of original patches merged into each patch
            token (ToMe, merging aggregations); None means 1 everywhere. Sizes enter attention as
            ``log(size)`` when ``prop_attn``.
        prop_attn: Whether attention adds ``log(patch_size)`` to the merged tokens' logits.
        cls_sizes: (B, 1 + M) float32 or None: ``[1, patch_size]`` in one buffer whose tail is
            ``patch_size``, so the key bias is one ``log`` (no pad for CLS). A ``replace`` that
            changes ``patch_size`` without it drops it.
    """

    hw_shape: tuple[int, int]
    source: torch.Tensor
    patch_idx: torch.Tensor
    dc_count: torch.Tensor
    dc_grid: tuple[str, int] | None = None
    residual: torch.Tensor | None = None
    patch_size: torch.Tensor | None = None
    prop_attn: bool = True
    cls_sizes: torch.Tensor | None = None

    @property
    def num_patches(self) -> int:
        """M, the number of HF patch tokens in the sequence."""
        return self.patch_idx.shape[1]

    @property
    def num_dc(self) -> int:
        """D, the number of DC tokens at the end of the sequence."""
        return self.dc_count.shape[1]

    def sizes(self) -> torch.Tensor:
        """(B, M) float32: original patches per patch token (ones when nothing was merged)."""
        if self.patch_size is not None:
            return self.patch_size.float()
        return torch.ones(self.patch_idx.shape, device=self.patch_idx.device)

    def __post_init__(self) -> None:
        # key_bias per dtype, built once per state (every block after a reduction reads it).
        object.__setattr__(self, "_bias_cache", {})

    def key_bias(self, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """Additive attention bias per key (B, 1 + M + D), or None when it is all zero.

        A DC window with no folded patch yet holds no information; it gets ``-inf`` so it receives
        no attention. Merged patch tokens get ``log(size)`` (proportional attention). Whether a
        bias is needed depends only on the state's structure, never on tensor values, so building
        it reads nothing on the host (no synchronisation on CUDA, no graph break when compiled).
        """
        sized = self.patch_size is not None and self.prop_attn
        if self.num_dc == 0 and not sized:
            return None
        if torch.compiler.is_compiling():  # traced: no cache (the graph fuses the few ops)
            return self._build_key_bias(sized, dtype)
        bias = self._bias_cache.get(dtype)
        if bias is None:
            bias = self._bias_cache[dtype] = self._build_key_bias(sized, dtype)
        return bias

    def _build_key_bias(self, sized: bool, dtype: torch.dtype) -> torch.Tensor:
        if self.num_dc == 0:  # merged tokens only: [0 (CLS), log(size)]
            if self.cls_sizes is not None:  # log(1) = 0 for CLS: one kernel, no pad
                return self.cls_sizes.log().to(dtype)
            return F.pad(self.patch_size.log(), (1, 0)).to(dtype)
        B, M = self.patch_idx.shape
        patch_bias = (self.patch_size.log() if sized
                      else self.dc_count.new_zeros(B, M))  # fmt: skip
        dc_bias = torch.where(self.dc_count > 0, 0.0, float("-inf"))
        cls_bias = self.dc_count.new_zeros(B, 1)
        return torch.cat([cls_bias, patch_bias.to(cls_bias.dtype), dc_bias], dim=1).to(dtype)

    def replace(self, **changes) -> TokenState:
        """A copy with ``changes`` (new sizes without their CLS buffer drop the old buffer)."""
        if "patch_size" in changes and "cls_sizes" not in changes:
            changes["cls_sizes"] = None
        return replace(self, **changes)


def is_initial(state: TokenState) -> bool:
    """Whether ``state`` is an :func:`init_state` (or a copy): ``source`` and ``patch_idx`` are
    then one identity map, which a reduction step can take as is instead of gathering through it.
    Decided from structure alone (the two maps are one tensor only there)."""
    return (
        state.source is state.patch_idx
        and state.num_dc == 0
        and state.patch_idx.shape[1] == state.source.shape[1]
    )


def init_state(batch: int, hw_shape: tuple[int, int], device: torch.device) -> TokenState:
    """State of an unreduced sequence: every patch is its own HF token (``source`` and
    ``patch_idx`` are the same identity tensor; see :func:`is_initial`)."""
    N = hw_shape[0] * hw_shape[1]
    idx = torch.arange(N, device=device).expand(batch, N)
    return TokenState(
        hw_shape=tuple(hw_shape),
        source=idx,
        patch_idx=idx,
        dc_count=torch.zeros(batch, 0, device=device),
    )

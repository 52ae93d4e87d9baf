"""Compact backbone output: the reduced token set plus the map back onto the patch grid.

With ``restore='copy'`` every patch that joined a token (merged into a kept token, or folded into
a DC token) is an exact copy of that token, so a decoder that is per-token apart from its
attention can run on the reduced set instead of the full grid: ``c`` identical keys act as one
key whose logit is raised by ``log c``, and identical queries give identical outputs.
:class:`CompactTokens` carries what such a decoder needs; ``restore()`` gives the full-grid map a
stock decoder would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.restore import restore_tokens
from ..ops.state import TokenState

__all__ = ["CompactOutputError", "CompactTokens", "compact_tokens"]


class CompactOutputError(AttributeError, TypeError):
    """A tensor attribute was read from :class:`CompactTokens`.

    An ``AttributeError``, so ``hasattr``/``getattr(x, name, default)`` probes keep working, and a
    ``TypeError``, which is what reading ``.shape`` of the wrong kind of object is.
    """


@dataclass(frozen=True)
class CompactTokens:
    """One backbone output level as a reduced token set.

    Attributes:
        tokens: (B, T, C) patch and DC tokens (CLS dropped), final norm applied where the
            full-grid output would have it.
        source: (B, N) long, N = H·W: the token in ``tokens`` that each grid position equals.
        counts: (B, T) float32 (float64 for float64 tokens): how many grid positions each token
            stands for (0 for an empty DC window, which no position reads).
        hw_shape: The patch grid (H, W).
        num_dc: How many of the tokens (the last ones) are DC tokens.
    """

    tokens: torch.Tensor
    source: torch.Tensor
    counts: torch.Tensor
    hw_shape: tuple[int, int]
    num_dc: int = 0

    def key_bias(self) -> torch.Tensor | None:
        """Additive attention bias per token, (B, T): ``log(count)``; None when all counts are 1.

        Attending once to a token with bias ``log c`` equals attending to its ``c`` grid copies;
        a count of 0 gives ``-inf`` (the token is not attended to). Decided from shapes alone:
        with as many tokens as grid positions and no DC token, every token stands for exactly
        one position (each stands for at least one), so no value is read on the host.
        """
        if self.tokens.shape[1] == self.source.shape[1] and self.num_dc == 0:
            return None
        return self.counts.log()

    def scatter(self, per_token: torch.Tensor) -> torch.Tensor:
        """Map per-token values (B, T, K) onto the grid: (B, K, H, W)."""
        B, _, K = per_token.shape
        grid = restore_tokens(per_token, self.source)  # (B, N, K)
        return grid.transpose(1, 2).reshape(B, K, *self.hw_shape)

    def restore(self) -> torch.Tensor:
        """The full-grid map (B, C, H, W) that the backbone returns without ``compact_output``."""
        return self.scatter(self.tokens)

    def __getattr__(self, name: str):
        # A stock mmseg head or neck reads ``.shape``/``.dim()``/... of a tensor: say what to do.
        if name.startswith("__"):
            raise AttributeError(name)
        raise CompactOutputError(
            f"the backbone returned CompactTokens (compact_output=True), which has no {name!r}: "
            "only fatr_seg's FATRSegmenterHead reads them. Use that head, or build the backbone "
            "with compact_output=False to get full-grid (B, C, H, W) maps for any mmseg head"
        )


def compact_tokens(
    tokens: torch.Tensor, state: TokenState, num_prefix_tokens: int = 1
) -> CompactTokens:
    """Build :class:`CompactTokens` from a sequence ``[CLS, patches, DC]`` and its state.

    ``num_prefix_tokens`` is 1 with a CLS token, 0 for a sequence without one.
    """
    x = tokens[:, num_prefix_tokens:]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    counts = x.new_zeros(x.shape[:2], dtype=dtype)
    counts.scatter_add_(1, state.source, torch.ones_like(state.source, dtype=dtype))
    return CompactTokens(x, state.source, counts, tuple(state.hw_shape), state.num_dc)

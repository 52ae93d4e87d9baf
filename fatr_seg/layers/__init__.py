"""torch modules of the method (attention, block, reducer, restorer, ViT trunk, mask head).

Nothing here imports mmseg, mmengine or mmcv.
"""

from .attention import Attention, hp_coefficients
from .block import Block
from .compact import CompactTokens, compact_tokens
from .config import PRESETS, REDUCTION_DEFAULTS, ReductionConfig
from .embed import PatchEmbed, resample_pos_embed
from .mask_head import MaskTransformerHead
from .reducer import TokenReducer
from .restorer import TokenRestorer
from .timm_vit import TimmFATRVisionTransformer
from .vit import FATRVisionTransformer, ReductionTrace

__all__ = [
    "PRESETS",
    "REDUCTION_DEFAULTS",
    "Attention",
    "Block",
    "CompactTokens",
    "FATRVisionTransformer",
    "MaskTransformerHead",
    "PatchEmbed",
    "ReductionConfig",
    "ReductionTrace",
    "TimmFATRVisionTransformer",
    "TokenReducer",
    "TokenRestorer",
    "compact_tokens",
    "hp_coefficients",
    "resample_pos_embed",
]

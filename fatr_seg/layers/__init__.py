"""torch modules of the method (attention, block, reducer, restorer, ViT trunk).

Nothing here imports mmseg, mmengine or mmcv.
"""

from .attention import Attention
from .block import Block
from .compact import CompactTokens, compact_tokens
from .config import REDUCTION_DEFAULTS, ReductionConfig
from .peer_reducers import EViTReducer, ToMeReducer, build_reducer
from .reducer import FrequencyTokenReducer
from .restorer import TokenRestorer
from .vit import FATRVisionTransformer, PatchEmbed, ReductionTrace

__all__ = [
    "REDUCTION_DEFAULTS",
    "Attention",
    "Block",
    "CompactTokens",
    "EViTReducer",
    "FATRVisionTransformer",
    "FrequencyTokenReducer",
    "PatchEmbed",
    "ReductionConfig",
    "ReductionTrace",
    "ToMeReducer",
    "TokenRestorer",
    "build_reducer",
    "compact_tokens",
]

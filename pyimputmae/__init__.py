"""pyimputmae: impuTMAE multimodal masked pre-training and survival prediction for oncology.

Importing needs only torch and numpy; the compiled kernels load lazily on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops, reference
from .ops import masked_mse, patch_embed, random_keep, random_masking, unshuffle_fill

__all__ = ["__version__", "masked_mse", "ops", "patch_embed", "random_keep", "random_masking", "reference", "unshuffle_fill"]

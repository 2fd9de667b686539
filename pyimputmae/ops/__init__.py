"""The fused ops, registered as ``torch.library`` custom ops (``torch.ops.pyimputmae.*``).

Each op dispatches, at run time and per device, to our compiled C++/CUDA kernels, our Triton
kernels or the PyTorch reference (``pyimputmae._backends``); pass ``backend=`` to choose.
"""

from .masked_mse import masked_mse
from .masking import random_keep, random_masking, unshuffle_fill
from .patch_embed import patch_embed

__all__ = ["masked_mse", "patch_embed", "random_keep", "random_masking", "unshuffle_fill"]

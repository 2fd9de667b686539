"""The fused ops, registered as ``torch.library`` custom ops (``torch.ops.pyimputmae.*``).

Each op dispatches, at run time and per device, to our compiled C++/CUDA kernels, our Triton
kernels or the PyTorch reference (``pyimputmae._backends``); pass ``backend=`` to choose.
One module per op family (``_masked_mse``, ``_masking``, ``_patch_embed``), private so that its name
never shadows the function of the same name exported here.
"""

from ._masked_mse import masked_mse
from ._masking import random_keep, random_masking, unshuffle_fill
from ._patch_embed import patch_embed

__all__ = ["masked_mse", "patch_embed", "random_keep", "random_masking", "unshuffle_fill"]

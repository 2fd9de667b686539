"""Triton kernels of pyimputmae: the ``triton`` backend (see ``pyimputmae._backends``).

The nine kernel-level functions, with the signatures and results of
``pyimputmae.reference.backend``. On CUDA tensors they compile for the GPU; on CPU tensors they run
only under ``TRITON_INTERPRET=1`` (set before triton is imported), each with one small configuration.
"""

from .masked_mse import masked_mse_forward, scale_grad_
from .masking import fill_backward, gather_visible, hidden_sum, select_keep, unshuffle_fill
from .patch_embed import patch_embed_backward, patch_embed_forward

__all__ = [
    "fill_backward",
    "gather_visible",
    "hidden_sum",
    "masked_mse_forward",
    "patch_embed_backward",
    "patch_embed_forward",
    "scale_grad_",
    "select_keep",
    "unshuffle_fill",
]

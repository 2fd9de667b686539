"""Triton kernels of pyimputmae: the ``triton`` backend (see ``pyimputmae._backends``).

The nine kernel-level functions of the fused ops, with the signatures and results of
``pyimputmae.reference.backend``, and the pre-norm sublayers' LayerNorm (``layer_norm_forward``,
``layer_norm_backward``: ``pyimputmae.model.prenorm``). On CUDA tensors they compile for the GPU; on
CPU tensors they run only under ``TRITON_INTERPRET=1`` (set before triton is imported), each with one
small configuration.
"""

from .layer_norm import layer_norm_backward, layer_norm_forward
from .layer_norm import supports as layer_norm_supports
from .masked_mse import masked_mse_forward, scale_grad_
from .masking import fill_backward, gather_visible, hidden_sum, select_keep, unshuffle_fill
from .patch_embed import patch_embed_backward, patch_embed_forward

__all__ = [
    "fill_backward",
    "gather_visible",
    "hidden_sum",
    "layer_norm_backward",
    "layer_norm_forward",
    "layer_norm_supports",
    "masked_mse_forward",
    "patch_embed_backward",
    "patch_embed_forward",
    "scale_grad_",
    "select_keep",
    "unshuffle_fill",
]

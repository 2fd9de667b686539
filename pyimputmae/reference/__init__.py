"""Readable pure-PyTorch twins of every fused op: the spec, the test oracle, the last fallback."""

from .masked_mse import masked_mse_forward_reference, masked_mse_reference, mse_weights, patch_target
from .masking import (
    gather_visible_reference,
    keep_counts,
    random_masking_reference,
    select_keep_reference,
    unshuffle_fill_reference,
)
from .patch_embed import check_patch_input, patch_embed_reference, patchify, unpatchify
from .philox import philox4x32, token_keys

__all__ = [
    "check_patch_input",
    "gather_visible_reference",
    "keep_counts",
    "masked_mse_forward_reference",
    "masked_mse_reference",
    "mse_weights",
    "patch_embed_reference",
    "patch_target",
    "patchify",
    "philox4x32",
    "random_masking_reference",
    "select_keep_reference",
    "token_keys",
    "unpatchify",
    "unshuffle_fill_reference",
]

"""Sizes the Triton kernels cannot index: a clear error before anything is allocated or launched.

The kernels take lengths, counts and loop bounds as 32-bit scalars (tensor offsets are 64-bit), so
each must stay below ``2^31 - 2^16``; a launch grid's second axis takes at most 65,535 tiles. The
inputs here are ``meta`` tensors: the shapes are real, nothing is allocated, and a launcher that
forgot its check would fail on the meta tensors with a different error than the one asserted.
"""

from __future__ import annotations

import pytest
import torch
from op_testing import backend_skip_reason

pytestmark = pytest.mark.skipif(
    backend_skip_reason("triton", torch.device("cpu")) is not None,
    reason=str(backend_skip_reason("triton", torch.device("cpu"))),
)

BIG = 2**31 - 2**16  # the first size refused


@pytest.fixture(scope="module")
def kernels():
    from pyimputmae import _backends

    return _backends.module("triton")


def meta(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_the_limit_is_the_last_size_accepted(kernels):
    from pyimputmae.kernels._utils import check_sizes

    check_sizes("op", n=BIG - 1)
    with pytest.raises(ValueError, match=r"op: n = 2,147,418,112 is too large for the Triton kernels"):
        check_sizes("op", n=BIG)


def test_patch_grid_of_2_to_the_32_patches_is_refused(kernels):
    """65,536² patches of one pixel: the product of the grid's sides wraps to 0 in 32 bits."""
    x = meta(1, 1, 65536, 65536)
    with pytest.raises(ValueError, match=r"patch input \(1, 1, 65536, 65536\), patch 1: patches = 4,294,967,296"):
        kernels.patch_embed_forward(x, meta(8, 1), None, None, None, 1)
    with pytest.raises(ValueError, match="patches = 4,294,967,296"):
        kernels.masked_mse_forward(meta(1, 2**32, 1), x, meta(1, 2**32), 1, False)


def test_patch_features_beyond_the_limit_are_refused(kernels):
    x = meta(1, 2**17, 128, 128)  # C·p² = 2^31 features in one patch of 128 × 128
    with pytest.raises(ValueError, match="features = 2,147,483,648"):
        kernels.patch_embed_forward(x, meta(1, 2**31), None, None, None, 128)


def test_embedding_width_and_keep_count_beyond_the_limit_are_refused(kernels):
    x = meta(1, 1, 8, 8)
    with pytest.raises(ValueError, match="patch_embed_forward: E = 2,147,418,112"):
        kernels.patch_embed_forward(x, meta(BIG, 16), None, None, None, 4)
    with pytest.raises(ValueError, match="patch_embed_backward: N = 2,147,418,112"):
        kernels.patch_embed_backward(meta(1, BIG, 8), x, meta(8, 16), meta(1, BIG, dtype=torch.int64), 4, False, True)


def test_masked_mse_rows_beyond_the_limit_are_refused(kernels):
    B = 2**17  # B·L = 2^17 · 2^14 = 2^31 rows of 1-pixel patches
    x = meta(B, 1, 2**14)
    with pytest.raises(ValueError, match=r"masked_mse: B\*L = 2,147,483,648"):
        kernels.masked_mse_forward(meta(B, 2**14, 1), x, meta(B, 2**14), 1, False)


def test_masking_lengths_beyond_the_limit_are_refused(kernels):
    rng = torch.zeros(2, dtype=torch.int64)
    present = torch.ones(1, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="select_keep: L = 2,147,483,648"):
        kernels.select_keep(present, [2**30, 2**30], [1, 1], rng)
    ids, mask = meta(1, 4, dtype=torch.int64), meta(1, BIG, dtype=torch.bool)
    with pytest.raises(ValueError, match="gather_visible: L = 2,147,418,112"):
        kernels.gather_visible(meta(1, BIG, 8), ids, mask)
    with pytest.raises(ValueError, match="unshuffle_fill: K = 2,147,418,112"):
        kernels.unshuffle_fill(meta(1, BIG, 8), meta(1, BIG, dtype=torch.int64), meta(1, 16, dtype=torch.bool),
                               meta(8))
    with pytest.raises(ValueError, match="hidden_sum: E = 2,147,418,112"):
        kernels.hidden_sum(meta(1, 4, BIG), meta(1, 4, dtype=torch.bool))


def test_rows_wider_than_one_launch_are_refused(kernels):
    """The copy kernels tile E along the grid's second axis; its 65,535 tiles bound E."""
    from pyimputmae.kernels._utils import GRID_Y_LIMIT, check_grid_y

    check_grid_y("op", "E", GRID_Y_LIMIT * 128, 128)
    with pytest.raises(ValueError, match=r"op: E = 8,388,481 is too large for one Triton launch \(at most 8,388,480\)"):
        check_grid_y("op", "E", GRID_Y_LIMIT * 128 + 1, 128)

"""Our CUDA kernels (csrc/cuda/) on machines without a GPU, under the host emulator of tests/cuda_emu/.

Two parts. First the emulator itself: it computes what correct CUDA code computes, and it reports
what hardware would hang on or get wrong (a missing barrier, divergent barriers, warp operations
naming exited lanes, device-side assertions, refused launches). Then the CUDA code paths that the
op suites' small shapes never reach (those suites run every case once more as backend ``cuda_emu``):
16-byte moves, segments longer than a block or than the key tile, more segments than one launch
takes, rows of masked MSE longer than what a block holds in registers, misaligned tensors. Each is
compared with the reference (``pyimputmae.reference.backend``), bit for bit where the op only moves
data or draws the mask.
"""

from __future__ import annotations

import pytest
import torch
from op_testing import assert_close, backend_skip_reason, cuda_emu_build, cuda_emu_ops

from pyimputmae.reference import backend as ref

pytestmark = pytest.mark.skipif(
    backend_skip_reason("cuda_emu", torch.device("cpu")) is not None,
    reason=str(backend_skip_reason("cuda_emu", torch.device("cpu"))),
)


@pytest.fixture(scope="module")
def emu():
    return cuda_emu_ops()


@pytest.fixture(scope="module")
def selftest():
    return cuda_emu_build().build_selftest()


# ---- the emulator ----------------------------------------------------------------------------

@pytest.mark.parametrize("threads", [32, 96, 1024])
def test_block_sum_returns_the_total_to_every_thread(selftest, threads):
    values = torch.randn(3000, dtype=torch.float32)
    out = selftest.block_sum(values, threads)
    torch.testing.assert_close(out, values.sum().expand(threads), rtol=1e-5, atol=1e-4)


def test_ballot_collects_one_bit_per_lane(selftest):
    flags = torch.rand(3, 128) < 0.5
    bits = selftest.ballot(flags)
    expected = [[sum(1 << lane for lane in range(32) if flags[b, 32 * w + lane]) for w in range(4)] for b in range(3)]
    assert bits.tolist() == expected


def test_a_missing_barrier_gives_a_wrong_result(selftest):
    """Threads run in a shuffled order, so reading shared memory before its writer has reached the
    barrier reads stale values, as it can on hardware; with the barrier the result is exact."""
    values = torch.arange(256, dtype=torch.float32)
    assert torch.equal(selftest.reverse(values, True), values.flip(0))
    values = values + 1000  # a launch with other values, so stale shared memory differs
    assert not torch.equal(selftest.reverse(values, False), values.flip(0))


@pytest.mark.parametrize("kind, message", [
    (0, "wait at different __syncthreads"),
    (1, "reached after 1 threads of the block have returned"),
    (2, "names lanes that have exited"),
    (3, "device-side assertion `t != 7"),
    (4, "invalid launch configuration"),
])
def test_faults_that_hang_or_fail_on_hardware_are_reported(selftest, kind, message):
    with pytest.raises(RuntimeError, match=message):
        selftest.fault(kind)


# ---- select_keep: long segments, many segments ---------------------------------------------

@pytest.mark.parametrize("lengths", [
    pytest.param((1500, 40), id="longer_than_a_block"),
    pytest.param((5000, 7), id="longer_than_the_key_tile"),
    pytest.param(tuple(range(1, 71)), id="70_segments_two_launches"),
])
def test_select_keep_matches_the_reference_bit_for_bit(emu, lengths):
    lengths = (*lengths, 3, 4)
    keeps = [n // 2 for n in lengths[:-2]] + [0, 4]  # ... nothing kept, everything kept
    present = torch.rand(3, len(lengths)) < 0.8
    present[1, 0] = False
    rng = torch.tensor([2**40 + 17, 99])
    ids, mask = emu.select_keep(present, list(lengths), keeps, rng)
    ids_ref, mask_ref = ref.select_keep(present, lengths, keeps, rng)
    assert torch.equal(ids, ids_ref)
    assert torch.equal(mask, mask_ref)


# ---- row movers: every unit width, misaligned rows -------------------------------------------

MOVER_CASES = {
    "fp32_16B_units": (torch.float32, 8, 0),
    "fp32_8B_units": (torch.float32, 6, 0),
    "fp32_4B_units": (torch.float32, 3, 0),
    "bf16_16B_units": (torch.bfloat16, 16, 0),
    "bf16_2B_units": (torch.bfloat16, 3, 0),
    "fp64_16B_units": (torch.float64, 4, 0),
    "fp32_misaligned": (torch.float32, 8, 1),  # storage offset of one element: 4-byte units only
    "wide_rows": (torch.float32, 1000, 0),  # more units than one warp covers
}


def _offset_tensor(shape: tuple[int, ...], dtype: torch.dtype, offset: int) -> torch.Tensor:
    n = torch.Size(shape).numel()
    return torch.randn(n + offset).to(dtype)[offset:].view(shape)


@pytest.mark.parametrize("case", MOVER_CASES)
def test_gather_and_unshuffle_fill_move_exactly(emu, case):
    dtype, E, offset = MOVER_CASES[case]
    lengths, keeps = [9, 30], [4, 15]
    present = torch.tensor([[True, True], [False, True], [True, False]])
    ids, mask = ref.select_keep(present, lengths, keeps, torch.tensor([5, 6]))
    tokens = _offset_tensor((3, sum(lengths), E), dtype, offset)
    visible = emu.gather_visible(tokens, ids, mask)
    assert torch.equal(visible, ref.gather_visible(tokens, ids, mask))
    x = _offset_tensor((3, sum(keeps), E), dtype, offset)
    token = _offset_tensor((E,), dtype, offset)
    assert torch.equal(emu.unshuffle_fill(x, ids, mask, token), ref.unshuffle_fill(x, ids, mask, token))


@pytest.mark.parametrize("dtype, E", [(torch.float32, 8), (torch.float32, 5), (torch.bfloat16, 24),
                                      (torch.float64, 6)])
def test_hidden_sum_is_deterministic_and_matches_the_reference(emu, dtype, E):
    grad = torch.randn(7, 300, E).to(dtype)  # 2,100 rows: several row chunks
    mask = torch.rand(7, 300) < 0.5
    out = emu.hidden_sum(grad, mask)
    assert_close(out, ref.hidden_sum(grad, mask).to(dtype), what="hidden_sum")
    assert torch.equal(out, emu.hidden_sum(grad, mask))


# ---- masked MSE: rows longer than a block's registers ----------------------------------------

@pytest.mark.parametrize("pred_dtype, spatial, patch", [
    pytest.param(torch.float32, (32, 32, 32), 32, id="fp32_P32768_vectorised"),
    pytest.param(torch.bfloat16, (24, 24, 24), 24, id="bf16_P13824_vectorised"),
    pytest.param(torch.float32, (2 * 4101,), 4101, id="fp32_P8202_scalar"),
    pytest.param(torch.float64, (16, 16, 16), 16, id="fp64_P4096"),
])
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
def test_masked_mse_multi_chunk_rows_match_the_reference(emu, pred_dtype, spatial, patch, norm_pix):
    B = 2
    x = torch.randn(B, 1, *spatial) * 3 + 1
    L = 1
    for s in spatial:
        L *= s // patch
    P = patch ** len(spatial)
    pred = torch.randn(B, L, P).to(pred_dtype)
    weight = (torch.rand(B, L) < 0.7).float()
    weight[0, 0] = 1.0
    loss, grad = emu.masked_mse_forward(pred, x, weight, patch, norm_pix)
    loss_ref, grad_ref = ref.masked_mse_forward(pred, x, weight, patch, norm_pix)
    assert_close(loss, loss_ref, dtype=torch.float64 if pred_dtype == torch.float64 else torch.float32,
                 what="loss")
    assert_close(grad, grad_ref.to(grad.dtype), what="grad")


def test_masked_mse_with_no_weight_is_zero_with_a_zero_gradient(emu):
    pred, x = torch.randn(2, 4, 16), torch.randn(2, 1, 64)
    loss, grad = emu.masked_mse_forward(pred, x, torch.zeros(2, 4), 16, True)
    assert loss.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype, n, offset, scale", [
    (torch.float32, 1001, 0, 0.5),
    (torch.float32, 1001, 1, 0.5),  # misaligned: scalar path
    (torch.bfloat16, 77, 0, -3.0),
    (torch.float64, 10, 0, 2.0),
])
def test_scale_grad_scales_every_element(emu, dtype, n, offset, scale):
    grad = _offset_tensor((n,), dtype, offset)
    expected = (grad.double() * scale).to(dtype)
    emu.scale_grad_(grad, torch.tensor([scale], dtype=torch.float64))
    assert torch.equal(grad, expected)


def test_scale_grad_by_one_touches_nothing(emu):
    grad = torch.full((100,), float("nan"))
    emu.scale_grad_(grad, torch.ones(1))
    assert torch.isnan(grad).all()


# ---- patch embedding: 16-byte moves in every dimensionality ----------------------------------

@pytest.mark.parametrize("dtype, spatial, patch", [
    pytest.param(torch.float32, (16, 16, 16), 4, id="3d_fp32_16B"),
    pytest.param(torch.bfloat16, (16, 16), 8, id="2d_bf16_16B"),
    pytest.param(torch.float64, (12,), 2, id="1d_fp64_16B"),
    pytest.param(torch.float32, (15, 15), 5, id="2d_fp32_scalar"),
])
@pytest.mark.parametrize("with_keep", [False, True], ids=["all", "keep"])
def test_patch_embed_forward_and_backward_match_the_reference(emu, dtype, spatial, patch, with_keep):
    B, C, E = 3, 2, 24
    x = torch.randn(B, C, *spatial).to(dtype)
    F = C * patch ** len(spatial)
    L = 1
    for s in spatial:
        L *= s // patch
    weight, bias, pos = torch.randn(E, F).to(dtype), torch.randn(E).to(dtype), torch.randn(L, E).to(dtype)
    keep = torch.stack([torch.randperm(L)[: L // 2].sort().values for _ in range(B)]) if with_keep else None
    out = emu.patch_embed_forward(x, weight, bias, pos, keep, patch)
    out_ref = ref.patch_embed_forward(x.double(), weight.double(), bias.double(), pos.double(), keep, patch)
    tol = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    assert_close(out, out_ref, dtype=tol, what="out")
    grad_out = torch.randn_like(out)
    grad_x, grad_w = emu.patch_embed_backward(grad_out, x, weight, keep, patch, True, True)
    grad_x_ref, grad_w_ref = ref.patch_embed_backward(grad_out.double(), x.double(), weight.double(), keep, patch,
                                                      True, True)
    assert_close(grad_x, grad_x_ref, dtype=tol, what="grad_x")
    assert_close(grad_w, grad_w_ref, dtype=tol, what="grad_weight")


def test_out_of_range_ids_fail_the_device_assertion(emu):
    tokens = torch.randn(1, 4, 8)
    ids = torch.tensor([[0, 9]])
    mask = torch.tensor([[False, False, True, True]])
    with pytest.raises(RuntimeError, match="device-side assertion"):
        emu.gather_visible(tokens, ids, mask)

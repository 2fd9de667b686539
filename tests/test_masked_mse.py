"""masked_mse on every backend against the spec (``pyimputmae.reference.masked_mse``): loss and
gradient, norm_pix, bf16 and fp16 with an fp32-accurate loss (fp16 keeping an fp32 gradient), the
empty-mask case, and the backward that scales the gradient saved by the forward (incoming gradient
≠ 1, repeated backward)."""

from __future__ import annotations

import pytest
import torch
from op_testing import (
    PatchInput,
    assert_close,
    assert_no_worse_than_torch,
    kernel_level_op,
)

from pyimputmae import _backends, masked_mse
from pyimputmae.ops import _masked_mse as mse_ops
from pyimputmae.reference import masked_mse_reference, mse_weights, patchify
from pyimputmae.reference.masked_mse import gradient_dtype, masked_mse_forward_reference

FAMILIES = ("masked_mse",)

CASES = {
    "1d": PatchInput(3, 1, (40,), 8),  # L = 5, P = 8
    "1d_b1_c2": PatchInput(1, 2, (36,), 6),  # L = 6, P = 12
    "2d_c3": PatchInput(2, 3, (8, 12), 4),  # L = 6, P = 48
    "2d_p5": PatchInput(3, 1, (10, 15), 5),  # L = 6, P = 25
    "3d_c2": PatchInput(2, 2, (4, 4, 6), 2),  # L = 12, P = 16
}
NORM_PIX = [pytest.param(False, id="raw"), pytest.param(True, id="norm_pix")]
FP = [pytest.param(torch.float64, id="fp64"), pytest.param(torch.float32, id="fp32")]


def make_inputs(case: PatchInput, dtype: torch.dtype, device: torch.device, x_dtype: torch.dtype | None = None):
    """pred, x, mask (bool, about half hidden) and present (last row absent when B > 1)."""
    x = torch.randn(case.batch, case.channels, *case.spatial).to(device, x_dtype or dtype)
    pred = torch.randn(case.batch, case.tokens, case.features).to(device, dtype)
    mask = torch.rand(case.batch, case.tokens, device=device) < 0.5
    mask[0, 0] = True
    present = torch.ones(case.batch, dtype=torch.bool, device=device)
    if case.batch > 1:
        present[-1] = False
    return pred, x, mask, present


def loss_and_grad(pred, x, mask, present, case, norm_pix, backend, scale: float = 1.0):
    """The backend's loss of ``pred`` and ``d(scale·loss)/d pred``."""
    leaf = pred.detach().clone().requires_grad_(True)
    loss = masked_mse(leaf, x, mask, present, patch=case.patch, norm_pix=norm_pix, backend=backend)
    (loss * scale).backward()
    return loss.detach(), leaf.grad


def reference_loss_and_grad(pred, x, mask, present, case, norm_pix, scale: float = 1.0):
    """The spec's loss and gradient through plain autograd."""
    leaf = pred.detach().clone().requires_grad_(True)
    loss = masked_mse_reference(leaf, x, mask, present, case.patch, norm_pix)
    (loss * scale).backward()
    return loss.detach(), leaf.grad


def plain_half_loss(pred, x, mask, present, patch, norm_pix):
    """The same computation as a user writes it, entirely in pred's (16-bit) dtype."""
    half = pred.dtype
    target = patchify(x, patch).to(half)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    w = (mask.to(half) * present.to(half).unsqueeze(1))
    return (((pred - target) ** 2).mean(-1) * w).sum() / w.sum()


@pytest.mark.parametrize("dtype", FP)
@pytest.mark.parametrize("norm_pix", NORM_PIX)
@pytest.mark.parametrize("case", CASES)
def test_loss_and_gradient_match_reference(backend, device, case, norm_pix, dtype):
    c = CASES[case]
    inputs = make_inputs(c, dtype, device)
    loss, grad = loss_and_grad(*inputs, c, norm_pix, backend)
    want_loss, want_grad = reference_loss_and_grad(*inputs, c, norm_pix)
    assert loss.shape == () and loss.dtype == dtype, f"loss must be a {dtype} scalar, got {loss.dtype} {loss.shape}"
    assert grad.dtype == dtype
    assert_close(loss, want_loss, what=f"{backend} loss")
    assert_close(grad, want_grad, what=f"{backend} grad")


# (pred's dtype, x's dtype): 16-bit predictions of an fp32 input (autocast) or of a 16-bit one
HALF_PAIRS = [
    pytest.param(torch.bfloat16, torch.float32, id="bf16-x_fp32"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bf16-x_bf16"),
    pytest.param(torch.float16, torch.float32, id="fp16-x_fp32"),
    pytest.param(torch.float16, torch.float16, id="fp16-x_fp16"),
]


@pytest.mark.parametrize("half, x_dtype", HALF_PAIRS)
@pytest.mark.parametrize("norm_pix", NORM_PIX)
@pytest.mark.parametrize("case", ["1d", "2d_c3", "3d_c2"])
def test_half_pred_gives_an_fp32_accurate_loss(backend, device, case, norm_pix, half, x_dtype):
    """fp32 accumulation: the loss of bf16 / fp16 predictions is as accurate as an fp32 computation
    on the same (16-bit) values, and the gradient, in pred's dtype, is no worse than plain PyTorch's
    in that dtype."""
    c = CASES[case]
    pred, x, mask, present = make_inputs(c, half, device, x_dtype)
    loss, grad = loss_and_grad(pred, x, mask, present, c, norm_pix, backend)
    want_loss, want_grad = reference_loss_and_grad(pred.float(), x.float(), mask, present, c, norm_pix)
    assert loss.dtype == torch.float32, f"{half} pred must give an fp32 loss, got {loss.dtype}"
    assert_close(loss, want_loss, dtype=torch.float32, what=f"{backend} {half} loss")
    assert grad.dtype == half
    plain_leaf = pred.clone().requires_grad_(True)
    plain_half_loss(plain_leaf, x, mask, present, c.patch, norm_pix).backward()
    assert_no_worse_than_torch(grad, plain_leaf.grad, want_grad, what=f"{backend} {half} grad")


FLOATS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


@pytest.mark.parametrize("x_dtype", FLOATS)
@pytest.mark.parametrize("pred_dtype", FLOATS)
def test_kernels_take_any_pair_of_float_dtypes(backend, device, pred_dtype, x_dtype):
    """The kernel-level forward with pred and x of any floating dtypes: the loss in fp32 (fp64 for
    fp64 pred) and the gradient in ``gradient_dtype(pred)``: pred's own, fp32 for fp16 pred."""
    c = CASES["2d_c3"]
    pred, x, mask, present = make_inputs(c, FLOATS[pred_dtype], device, FLOATS[x_dtype])
    w = mse_weights(mask, present).contiguous()
    loss, grad = _backends.module(backend).masked_mse_forward(pred, x, w, c.patch, True)
    want_loss, want_grad = masked_mse_forward_reference(pred, x, w, c.patch, True)
    assert (loss.dtype, grad.dtype) == (want_loss.dtype, gradient_dtype(pred.dtype)), (
        f"{backend}: loss {loss.dtype} and grad {grad.dtype} for {pred_dtype} pred")
    assert_close(loss, want_loss, what=f"{backend} loss")
    assert_close(grad, want_grad, what=f"{backend} grad")


def skip_unless_fp16(backend: str) -> None:
    dtypes = _backends.DTYPES.get(backend)
    if dtypes is not None and torch.float16 not in dtypes:
        pytest.skip(f"the {backend} backend takes no float16")


@pytest.mark.parametrize("scale", [1024.0, 65536.0], ids=["scale_1024", "gradscaler_initial_scale"])
@pytest.mark.parametrize("norm_pix", NORM_PIX)
def test_fp16_pred_gradient_survives_a_loss_scale(backend, device, norm_pix, scale):
    """fp16 autocast trains with ``torch.amp.GradScaler``: the loss is multiplied by a scale (65,536 at
    first: above fp16's largest value, 65,504) precisely because gradients such as
    ``2·w·(pred − target)/(P·Σw)`` (here ~8e-6, below fp16's normal range, 6e-5) lose their digits in fp16.
    The gradient must be no worse than plain PyTorch's, where autograd scales the fp32 loss's
    gradient and rounds it to fp16 once; the loss stays fp32."""
    skip_unless_fp16(backend)
    c = PatchInput(32, 1, (16, 16, 32), 16)  # L = 2, P = 4,096, Σw = 64
    pred, x, mask, present = make_inputs(c, torch.float16, device, torch.float32)
    mask = torch.ones_like(mask)
    loss, grad = loss_and_grad(pred, x, mask, present, c, norm_pix, backend, scale=scale)
    want_loss, want_grad = reference_loss_and_grad(pred.double(), x.double(), mask, present, c, norm_pix, scale=scale)
    assert loss.dtype == torch.float32, f"fp16 pred must give an fp32 loss, got {loss.dtype}"
    assert_close(loss, want_loss, dtype=torch.float32, what=f"{backend} fp16 loss")
    assert_no_worse_than_torch(grad, want_grad.to(torch.float16), want_grad, what=f"{backend} fp16 grad ·{scale:g}")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
                                   pytest.param(torch.float16, id="fp16"), pytest.param(torch.float64, id="fp64")])
@pytest.mark.parametrize("norm_pix", NORM_PIX)
@pytest.mark.parametrize("empty", ["mask_all_false", "present_all_false"])
def test_nothing_to_count_gives_zero_loss_and_zero_gradient(backend, device, empty, norm_pix, dtype):
    c = CASES["2d_c3"]
    pred, x, mask, present = make_inputs(c, dtype, device)
    if empty == "mask_all_false":
        mask = torch.zeros_like(mask)
    else:
        present = torch.zeros_like(present)
    loss, grad = loss_and_grad(pred, x, mask, present, c, norm_pix, backend, scale=2.5)
    assert not torch.isnan(loss), f"{backend}: NaN loss with nothing to count"
    assert loss.item() == 0.0, f"{backend}: loss {loss.item()} with nothing to count"
    assert torch.isfinite(grad).all() and (grad == 0).all(), f"{backend}: nonzero or NaN gradient"


@pytest.mark.parametrize("scale", [3.0, -0.25, 0.0], ids=["times3", "times_minus_quarter", "times0"])
def test_gradient_is_scaled_by_the_incoming_gradient(backend, device, scale):
    """(loss * s).backward(): the saved gradient is scaled by s, not returned as if s were 1."""
    c = CASES["3d_c2"]
    inputs = make_inputs(c, torch.float32, device)
    _, grad = loss_and_grad(*inputs, c, True, backend, scale=scale)
    _, want = reference_loss_and_grad(*inputs, c, True, scale=scale)
    assert_close(grad, want, what=f"{backend} grad of loss·{scale}")


def test_retain_graph_backward_twice_accumulates_the_right_gradient(backend, device):
    c = CASES["2d_p5"]
    pred, x, mask, present = make_inputs(c, torch.float32, device)
    _, want = reference_loss_and_grad(pred, x, mask, present, c, False)
    leaf = pred.clone().requires_grad_(True)
    loss = masked_mse(leaf, x, mask, present, patch=c.patch, backend=backend)
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward(retain_graph=True)
    second = leaf.grad.clone()
    loss.backward()
    assert_close(first, want, what=f"{backend} first backward")
    assert_close(second, 2 * want, what=f"{backend} after two backwards")
    assert_close(leaf.grad, 3 * want, what=f"{backend} after three backwards")


def test_repeated_backward_with_different_scales_gives_each_its_own_gradient(backend, device):
    """autograd.grad through one graph with incoming gradients 2, 5 and 1; the first result must not
    be changed by the later calls (the saved gradient is scaled in place only once)."""
    c = CASES["1d"]
    pred, x, mask, present = make_inputs(c, torch.float32, device)
    _, want = reference_loss_and_grad(pred, x, mask, present, c, True)
    leaf = pred.clone().requires_grad_(True)
    loss = masked_mse(leaf, x, mask, present, patch=c.patch, norm_pix=True, backend=backend)
    (g2,) = torch.autograd.grad(loss * 2, leaf, retain_graph=True)
    (g5,) = torch.autograd.grad(loss * 5, leaf, retain_graph=True)
    (g1,) = torch.autograd.grad(loss, leaf)
    assert_close(g2, 2 * want, what=f"{backend} first call, scale 2 (checked after all three)")
    assert_close(g5, 5 * want, what=f"{backend} second call, scale 5")
    assert_close(g1, want, what=f"{backend} third call, scale 1")


@pytest.mark.parametrize("norm_pix", NORM_PIX)
def test_gradcheck_fp64_wrt_pred(backend, device, norm_pix):
    c = PatchInput(2, 1, (8,), 4)
    pred, x, _, present = make_inputs(c, torch.float64, device)
    mask = torch.tensor([[True, False], [True, True]], device=device)
    present = torch.ones_like(present)
    pred.requires_grad_(True)

    def fn(p):
        return masked_mse(p, x, mask, present, patch=c.patch, norm_pix=norm_pix, backend=backend)

    assert torch.autograd.gradcheck(fn, (pred,), fast_mode=True)


def test_soft_mask_weights_each_patch(backend, device):
    """A float mask in [0, 1] weights the patches: Σ w·mse / Σ w."""
    c = CASES["2d_p5"]
    pred, x, _, present = make_inputs(c, torch.float32, device)
    weights = torch.rand(c.batch, c.tokens, device=device)
    loss, grad = loss_and_grad(pred, x, weights, present, c, False, backend)
    want_loss, want_grad = reference_loss_and_grad(pred, x, weights, present, c, False)
    assert_close(loss, want_loss)
    assert_close(grad, want_grad)


def test_mask_as_bool_int_or_float_gives_the_same_loss(backend, device):
    c = CASES["1d"]
    pred, x, mask, present = make_inputs(c, torch.float32, device)
    losses = [masked_mse(pred, x, m, present, patch=c.patch, backend=backend)
              for m in (mask, mask.to(torch.int64), mask.to(torch.float32))]
    assert losses[0] == losses[1] == losses[2]


def test_no_present_means_every_row_counts(backend, device):
    c = CASES["2d_c3"]
    pred, x, mask, _ = make_inputs(c, torch.float32, device)
    everyone = torch.ones(c.batch, dtype=torch.bool, device=device)
    assert masked_mse(pred, x, mask, patch=c.patch, backend=backend) == masked_mse(
        pred, x, mask, everyone, patch=c.patch, backend=backend)


def test_constant_patch_with_norm_pix_stays_finite(backend, device):
    """A flat patch has variance 0: eps keeps its normalised target finite (all zeros)."""
    c = CASES["2d_c3"]
    pred, x, mask, present = make_inputs(c, torch.float32, device)
    x[0, :, :4, :4] = 0.7  # patch 0 of row 0, which is counted
    loss, grad = loss_and_grad(pred, x, mask, present, c, True, backend)
    want_loss, want_grad = reference_loss_and_grad(pred, x, mask, present, c, True)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close(loss, want_loss)
    assert_close(grad, want_grad)


def test_no_gradient_flows_into_the_input(backend, device):
    c = CASES["1d"]
    pred, x, mask, present = make_inputs(c, torch.float32, device)
    x.requires_grad_(True)
    pred.requires_grad_(True)
    masked_mse(pred, x, mask, present, patch=c.patch, backend=backend).backward()
    assert x.grad is None and pred.grad is not None


@pytest.mark.parametrize("norm_pix", NORM_PIX)
def test_opcheck_masked_mse(backend, device, norm_pix):
    c = CASES["2d_c3"]
    pred, x, mask, present = make_inputs(c, torch.float32, device)
    w = mse_weights(mask, present).contiguous()
    # test_aot_dispatch_dynamic is left out by design: the backward scales the gradient saved by the
    # forward (one of its outputs) in place, to avoid a second pass over pred, which that check
    # rejects; real torch.compile of the op is tested (forward and backward) in test_compile.py
    torch.library.opcheck(mse_ops._masked_mse, (pred.requires_grad_(True), x, w, c.patch, norm_pix, backend),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def test_opcheck_scale_grad(backend, device):
    grad = torch.randn(2, 3, 4, device=device)
    torch.library.opcheck(mse_ops._scale_grad, (grad, torch.tensor([0.5], device=device), backend))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("scale", [1.0, 2.0, -0.5])
def test_scale_grad_multiplies_in_place(backend, device, scale, dtype):
    grad = torch.randn(3, 5, 7, device=device).to(FLOATS[dtype])
    before = grad.clone()
    _backends.module(backend).scale_grad_(grad, torch.tensor([scale], device=device))
    assert torch.equal(grad, before * scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])  # fp16: an fp32 grad
@pytest.mark.parametrize("name", ["masked_mse_forward", "scale_grad_"])
def test_opcheck_kernel_level_ext_op(device, name, dtype):
    op, reason = kernel_level_op(name, device)
    if op is None:
        pytest.skip(reason)
    c = CASES["2d_c3"]
    pred, x, mask, present = make_inputs(c, dtype, device)
    args = {
        "masked_mse_forward": (pred, x, mse_weights(mask, present).contiguous(), c.patch, True),
        "scale_grad_": (torch.randn_like(pred), torch.tensor([0.5], device=device)),
    }[name]
    torch.library.opcheck(op, args)


def test_rejects_mismatched_shapes_with_a_clear_message():
    x = torch.zeros(2, 1, 16)
    with pytest.raises(ValueError, match=r"pred must be \(B, L, P\) = \(2, 4, 4\)"):
        masked_mse(torch.zeros(2, 4, 5), x, torch.ones(2, 4), patch=4)
    with pytest.raises(ValueError, match=r"mask must be \(B, L\) = \(2, 4\)"):
        masked_mse(torch.zeros(2, 4, 4), x, torch.ones(2, 3), patch=4)
    with pytest.raises(ValueError, match=r"present must be \(B,\)"):
        masked_mse(torch.zeros(2, 4, 4), x, torch.ones(2, 4), torch.ones(3), patch=4)


def test_repeated_backward_after_the_gradient_was_changed_in_place_raises(backend):
    """pred a view of a leaf: the first backward's gradient becomes (a view of) the leaf's .grad and the
    next accumulation changes it in place. A further backward through the same graph must then refuse
    (the saved gradient no longer holds d loss / d pred), not return a wrong gradient."""
    x = torch.randn(2, 1, 8, 8)
    leaf = torch.randn(2, 64, requires_grad=True)
    loss = masked_mse(leaf.view(2, 4, 16), x, torch.ones(2, 4, dtype=torch.bool), patch=4, backend=backend)
    loss.backward(retain_graph=True)
    first = leaf.grad.clone()
    loss.backward(retain_graph=True)  # still right: the saved gradient was not changed before this one
    assert_close(leaf.grad, 2 * first, what=f"{backend}: second accumulated gradient")
    with pytest.raises(RuntimeError, match="changed in place"):
        loss.backward()


def test_integer_input_is_the_target_by_value(backend, device):
    """A uint8 image as the raw input: the same loss as its float values (ext refused it)."""
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8).to(device)
    pred = (torch.rand(2, 4, 16) * 255).to(device).requires_grad_(True)
    mask = torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]], dtype=torch.bool).to(device)
    loss = masked_mse(pred, x, mask, patch=4, backend=backend)
    loss.backward()
    ref_pred = pred.detach().clone().requires_grad_(True)
    expected = masked_mse_reference(ref_pred, x.float(), mask, None, 4)
    expected.backward()
    assert_close(loss, expected, what=f"{backend}: loss")
    assert_close(pred.grad, ref_pred.grad, what=f"{backend}: grad")


@pytest.mark.parametrize("name", ["x", "mask", "present"])
def test_an_argument_on_another_device_is_refused_by_name(name):
    args = {"pred": torch.zeros(2, 4, 16), "x": torch.zeros(2, 1, 8, 8), "mask": torch.ones(2, 4),
            "present": torch.ones(2)}
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is on meta but pred is on cpu: move it there"):
        masked_mse(*args.values(), patch=4)


def test_patch_size_may_be_a_numpy_integer_and_a_float_is_refused(backend):
    import numpy as np

    pred, x, mask = torch.randn(2, 4, 16), torch.randn(2, 1, 8, 8), torch.ones(2, 4)
    expected = masked_mse_reference(pred, x, mask, None, 4)
    assert_close(masked_mse(pred, x, mask, patch=np.int64(4), backend=backend), expected, what=backend)
    with pytest.raises(TypeError, match=r"patch size must be an integer, got 4\.0 \(float\)"):
        masked_mse(pred, x, mask, patch=4.0, backend=backend)

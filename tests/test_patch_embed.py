"""patch_embed on every backend against the spec (``pyimputmae.reference.patch_embed``) and nn.ConvNd."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from op_testing import (
    HALF_DTYPES,
    TOLERANCES,
    PatchInput,
    assert_close,
    assert_no_worse_than_torch,
    backend_skip_reason,
    kernel_level_op,
    tool_module,
)
from torch import nn

from pyimputmae import _backends, patch_embed
from pyimputmae.ops import _patch_embed as patch_ops
from pyimputmae.reference import backend as reference_kernels
from pyimputmae.reference import patch_embed_reference

FAMILIES = ("patch_embed",)


@dataclass(frozen=True)
class PatchCase(PatchInput):
    embed: int  # E


# token counts 6, 4, 6, 15, 16, 12 and widths that are no multiple of a typical block size
CASES = {
    "1d_c1": PatchCase(2, 1, (24,), 4, 10),
    "1d_c3_b1": PatchCase(1, 3, (20,), 5, 7),
    "2d_c3": PatchCase(2, 3, (8, 12), 4, 16),
    "2d_grid3x5": PatchCase(3, 2, (6, 10), 2, 6),
    "3d_c2": PatchCase(2, 2, (4, 8, 4), 2, 12),
    "3d_p4_b1": PatchCase(1, 1, (8, 8, 12), 4, 5),
}
# which optional inputs are given: (bias, pos, keep)
VARIANTS = {
    "plain": (False, False, False),
    "bias_pos": (True, True, False),
    "keep": (False, False, True),
    "keep_bias_pos": (True, True, True),
}
# tiny shapes for gradcheck: fp64 numerical Jacobians, also under the Triton interpreter
TINY = {
    "1d": PatchCase(2, 2, (6,), 2, 3),
    "2d": PatchCase(2, 1, (4, 6), 2, 3),
    "3d": PatchCase(1, 2, (2, 4, 2), 2, 2),
}


def random_keep(batch: int, tokens: int, kept: int, device: torch.device) -> torch.Tensor:
    """``(B, K)`` distinct patch indices per row, in random (unsorted) order."""
    return torch.stack([torch.randperm(tokens)[:kept] for _ in range(batch)]).to(device)


def make_inputs(case: PatchCase, variant: str, dtype: torch.dtype, device: torch.device) -> dict:
    with_bias, with_pos, with_keep = VARIANTS[variant]
    E, F, L = case.embed, case.features, case.tokens
    return {
        "x": torch.randn(case.batch, case.channels, *case.spatial, dtype=dtype).to(device),
        "weight": (torch.randn(E, F, dtype=dtype) / math.sqrt(F)).to(device),
        "bias": torch.randn(E, dtype=dtype).to(device) if with_bias else None,
        "pos": torch.randn(L, E, dtype=dtype).to(device) if with_pos else None,
        "keep": random_keep(case.batch, L, max(1, L // 2), device) if with_keep else None,
    }


def as_dtype(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if v is not None and v.is_floating_point() else v) for k, v in inputs.items()}


def embed(inputs: dict, case: PatchCase, backend: str) -> torch.Tensor:
    return patch_embed(inputs["x"], inputs["weight"], inputs["bias"], inputs["pos"], inputs["keep"],
                       patch=case.patch, backend=backend)


def embed_reference(inputs: dict, case: PatchCase) -> torch.Tensor:
    return patch_embed_reference(inputs["x"], inputs["weight"], inputs["bias"], inputs["pos"], inputs["keep"],
                                 case.patch)


def with_grad(inputs: dict) -> dict:
    return {k: (v.detach().clone().requires_grad_(True) if v is not None and v.is_floating_point() else v)
            for k, v in inputs.items()}


def grads(inputs: dict) -> dict:
    return {k: v.grad for k, v in inputs.items() if v is not None and v.is_floating_point()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_reference(backend, device, case, variant, dtype):
    c = CASES[case]
    inputs = make_inputs(c, variant, dtype, device)
    out = embed(inputs, c, backend)
    n = c.tokens if inputs["keep"] is None else inputs["keep"].shape[1]
    assert out.shape == (c.batch, n, c.embed) and out.dtype == dtype and out.device.type == device.type
    assert_close(out, embed_reference(inputs, c), what=f"{backend} {case} {variant}")


@pytest.mark.parametrize("half", HALF_DTYPES)
@pytest.mark.parametrize("variant", ["plain", "keep_bias_pos"])
@pytest.mark.parametrize("case", CASES)
def test_half_forward_is_no_worse_than_plain_torch(backend, device, case, variant, half):
    """bf16 / fp16 inputs: fp32 accumulation, rounded once; no worse than plain PyTorch in that dtype."""
    c = CASES[case]
    inputs = as_dtype(make_inputs(c, variant, torch.float32, device), half)
    out = embed(inputs, c, backend)
    assert out.dtype == half
    assert_no_worse_than_torch(out, embed_reference(inputs, c), embed_reference(as_dtype(inputs, torch.float32), c),
                               what=f"{backend} {case}")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("with_keep", [False, True], ids=["all_patches", "keep"])
@pytest.mark.parametrize("dims", [1, 2, 3], ids=["conv1d", "conv2d", "conv3d"])
def test_equals_conv_with_kernel_equal_to_stride(backend, device, dims, with_keep, dtype):
    channels, patch, embed_dim = 2, 4, 9
    spatial = {1: (20,), 2: (8, 12), 3: (4, 8, 12)}[dims]
    conv = getattr(nn, f"Conv{dims}d")(channels, embed_dim, patch, stride=patch).to(device, dtype)
    x = torch.randn(3, channels, *spatial, dtype=dtype, device=device)
    pos = torch.randn(math.prod(s // patch for s in spatial), embed_dim, dtype=dtype, device=device)
    with torch.no_grad():
        expected = conv(x).flatten(2).transpose(1, 2) + pos
        keep = None
        if with_keep:
            keep = random_keep(3, pos.shape[0], 3, device)
            expected = torch.gather(expected, 1, keep.unsqueeze(-1).expand(-1, -1, embed_dim))
        out = patch_embed(x, conv.weight.flatten(1), conv.bias, pos, keep, patch=patch, backend=backend)
    assert_close(out, expected, what=f"{backend} vs nn.Conv{dims}d")


@pytest.mark.parametrize("case", ["1d_c3_b1", "2d_c3", "3d_c2"])
def test_keep_ignores_patches_that_are_not_kept(backend, device, case):
    """Only the kept patches are read: NaNs elsewhere neither leak into the output nor the gradient."""
    c = CASES[case]
    inputs = make_inputs(c, "keep_bias_pos", torch.float32, device)
    clean = embed_reference(inputs, c)
    # poison every patch a row does not keep
    grid = [s // c.patch for s in c.spatial]
    unread = torch.ones(c.batch, c.tokens, dtype=torch.bool, device=device)
    unread.scatter_(1, inputs["keep"], False)
    pixel_unread = unread.view(c.batch, 1, *grid)
    for axis in range(len(grid)):
        pixel_unread = pixel_unread.repeat_interleave(c.patch, dim=2 + axis)
    x = inputs["x"].masked_fill(pixel_unread.expand_as(inputs["x"]), float("nan"))
    inputs = with_grad({**inputs, "x": x})
    out = embed(inputs, c, backend)
    assert torch.isfinite(out).all(), f"{backend}: NaN from an unread patch reached the output"
    assert_close(out, clean, what=f"{backend} {case}")
    out.backward(torch.randn_like(out))
    gx = inputs["x"].grad
    assert torch.isfinite(gx).all()
    assert (gx[pixel_unread.expand_as(gx)] == 0).all(), f"{backend}: nonzero gradient on an unread patch"
    assert torch.isfinite(inputs["weight"].grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("variant", ["bias_pos", "keep_bias_pos"])
@pytest.mark.parametrize("case", CASES)
def test_backward_matches_reference(backend, device, case, variant, dtype):
    c = CASES[case]
    inputs = make_inputs(c, variant, dtype, device)
    ours, ref = with_grad(inputs), with_grad(inputs)
    out = embed(ours, c, backend)
    g = torch.randn_like(out)
    out.backward(g)
    embed_reference(ref, c).backward(g)
    wrong = []  # every input's verdict, not just the first one's
    for name, expected in grads(ref).items():
        try:
            assert grads(ours)[name] is not None, f"{backend}: no gradient for {name}"
            assert_close(grads(ours)[name], expected, what=f"{backend} {case} {variant} grad {name}")
        except AssertionError as err:
            wrong.append(str(err))
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("half", HALF_DTYPES)
@pytest.mark.parametrize("variant", ["bias_pos", "keep_bias_pos"])
@pytest.mark.parametrize("case", ["1d_c1", "2d_c3", "3d_c2"])
def test_half_backward_is_no_worse_than_plain_torch(backend, device, case, variant, half):
    c = CASES[case]
    base = as_dtype(make_inputs(c, variant, torch.float32, device), half)
    ours, plain, ref = with_grad(base), with_grad(base), with_grad(as_dtype(base, torch.float32))
    g = torch.randn(c.batch, base["keep"].shape[1] if base["keep"] is not None else c.tokens, c.embed,
                    device=device).to(half)
    embed(ours, c, backend).backward(g)
    embed_reference(plain, c).backward(g)
    embed_reference(ref, c).backward(g.float())
    for name in grads(ref):
        assert_no_worse_than_torch(grads(ours)[name], grads(plain)[name], grads(ref)[name],
                                   what=f"{backend} {case} grad {name}")


@pytest.mark.parametrize("with_keep", [False, True], ids=["all_patches", "keep"])
@pytest.mark.parametrize("case", TINY)
def test_gradcheck_fp64(backend, device, case, with_keep):
    c = TINY[case]
    inputs = with_grad(make_inputs(c, "keep_bias_pos" if with_keep else "bias_pos", torch.float64, device))
    keep = inputs["keep"]

    def fn(x, weight, bias, pos):
        return patch_embed(x, weight, bias, pos, keep, patch=c.patch, backend=backend)

    assert torch.autograd.gradcheck(fn, (inputs["x"], inputs["weight"], inputs["bias"], inputs["pos"]),
                                    fast_mode=True)


@pytest.mark.parametrize("wanted", ["x", "weight"])
def test_gradient_of_one_input_alone_matches_reference(backend, device, wanted):
    """The backward skips the GEMM whose gradient nobody asked for and still gets the other right."""
    c = CASES["2d_c3"]
    inputs = make_inputs(c, "keep_bias_pos", torch.float32, device)
    ours = {**inputs, wanted: inputs[wanted].clone().requires_grad_(True)}
    embed(ours, c, backend).sum().backward()
    ref = {**inputs, wanted: inputs[wanted].clone().requires_grad_(True)}
    embed_reference(ref, c).sum().backward()
    assert_close(ours[wanted].grad, ref[wanted].grad, what=f"{backend} grad {wanted} alone")


def test_non_contiguous_input_matches_contiguous(backend, device):
    c = CASES["2d_c3"]
    inputs = make_inputs(c, "bias_pos", torch.float32, device)
    x_t = inputs["x"].transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    assert not x_t.is_contiguous()
    out = patch_embed(x_t, inputs["weight"], inputs["bias"], inputs["pos"], patch=c.patch, backend=backend)
    assert_close(out, embed_reference(inputs, c))


def test_strided_weight_bias_and_positions_match_contiguous(backend, device):
    """Views with strides (every other element of a larger tensor) are read as their values: a
    strided bias once reached the Triton kernels as it was, which read it as contiguous."""
    c = CASES["3d_c2"]
    inputs = make_inputs(c, "bias_pos", torch.float32, device)

    def strided(t: torch.Tensor) -> torch.Tensor:
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]

    views = {name: strided(inputs[name]) for name in ("weight", "bias", "pos")}
    assert not any(v.is_contiguous() for v in views.values())
    out = patch_embed(inputs["x"], views["weight"], views["bias"], views["pos"], patch=c.patch, backend=backend)
    assert_close(out, embed_reference(inputs, c), what=f"{backend} strided weight, bias, pos")


@pytest.mark.parametrize("variant", ["bias_pos", "keep_bias_pos"])
def test_opcheck_patch_embed(backend, device, variant):
    c = CASES["2d_grid3x5"]
    i = with_grad(make_inputs(c, variant, torch.float32, device))
    torch.library.opcheck(patch_ops._patch_embed,
                          (i["x"], i["weight"], i["bias"], i["pos"], i["keep"], c.patch, backend))


@pytest.mark.parametrize("with_keep, need", [
    pytest.param(False, (True, True), id="all_patches-x_and_w"),
    pytest.param(True, (True, True), id="keep-x_and_w"),
    pytest.param(True, (True, False), id="keep-x_only"),
    pytest.param(False, (False, True), id="all_patches-w_only"),
])
def test_opcheck_patch_embed_backward(backend, device, with_keep, need):
    c = CASES["3d_c2"]
    i = make_inputs(c, "keep" if with_keep else "plain", torch.float32, device)
    n = i["keep"].shape[1] if with_keep else c.tokens
    grad_out = torch.randn(c.batch, n, c.embed, device=device)
    torch.library.opcheck(patch_ops._patch_embed_backward,
                          (grad_out, i["x"], i["weight"], i["keep"], c.patch, *need, backend))


@pytest.mark.parametrize("with_keep", [False, True], ids=["all_patches", "keep"])
def test_opcheck_kernel_level_ext_ops(device, with_keep):
    c = CASES["2d_c3"]
    i = make_inputs(c, "keep_bias_pos" if with_keep else "bias_pos", torch.float32, device)
    n = i["keep"].shape[1] if with_keep else c.tokens
    grad_out = torch.randn(c.batch, n, c.embed, device=device)
    calls = {
        "patch_embed_forward": (i["x"], i["weight"], i["bias"], i["pos"], i["keep"], c.patch),
        "patch_embed_backward": (grad_out, i["x"], i["weight"], i["keep"], c.patch, True, True),
    }
    for name, args in [*calls.items(),  # one gradient only: the other output is empty(0), fake and real
                       ("patch_embed_backward", (*calls["patch_embed_backward"][:5], True, False)),
                       ("patch_embed_backward", (*calls["patch_embed_backward"][:5], False, True))]:
        op, reason = kernel_level_op(name, device)
        if op is None:
            pytest.skip(reason)
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("half", HALF_DTYPES)
def test_autocast_runs_in_the_autocast_dtype(backend, device, half):
    c = CASES["1d_c1"]
    inputs = make_inputs(c, "bias_pos", torch.float32, device)
    with torch.autocast(device.type, dtype=half):
        out = embed(inputs, c, backend)
    assert out.dtype == half
    assert_close(out, embed_reference(inputs, c), dtype=half)


@pytest.mark.parametrize("half", HALF_DTYPES)
@pytest.mark.parametrize("variant", ["plain", "keep_bias_pos"])
@pytest.mark.parametrize("case", ["1d_c1", "2d_c3", "3d_c2"])
def test_fp32_input_under_half_autocast_is_rounded_as_it_is_read(backend, device, case, variant, half):
    """Autocast hands the kernels x in float32 with bfloat16 (or float16) weight, bias and pos: the
    result is in autocast's dtype and equals the embedding of everything rounded to it (the bf16 / fp16
    criterion), and so do the gradients; at the kernel level grad_x comes back in x's dtype,
    grad_weight in weight's."""
    c = CASES[case]
    leaves = with_grad(make_inputs(c, variant, torch.float32, device))
    with torch.autocast(device.type, dtype=half):
        out = embed(leaves, c, backend)
    assert out.dtype == half
    rounded = with_grad(as_dtype(as_dtype(leaves, half), torch.float32))  # fp32 values of the 16-bit ones
    expected = embed_reference(rounded, c)
    assert_no_worse_than_torch(out, embed_reference(as_dtype(leaves, half), c), expected,
                               what=f"{backend} {case} {variant}")
    grad_out = torch.randn(out.shape, device=device).to(half)
    out.backward(grad_out)
    expected.backward(grad_out.float())
    for name, grad in grads(leaves).items():
        assert_close(grad, rounded[name].grad, dtype=half, what=f"{backend} {case} {variant} grad {name}")
    x, weight = leaves["x"].detach(), leaves["weight"].detach().to(half)
    grad_x, grad_w = _backends.module(backend).patch_embed_backward(grad_out, x, weight, leaves["keep"], c.patch,
                                                                    True, True)
    assert (grad_x.dtype, grad_w.dtype) == (torch.float32, half)


# x and weight of different dtypes at the kernel level (x fp32 with 16-bit weights is autocast's case,
# tested above through the op): x's dtype, weight's dtype
MIXED = {
    "x_fp16_w_fp32": (torch.float16, torch.float32),
    "x_fp16_w_bf16": (torch.float16, torch.bfloat16),
    "x_bf16_w_fp16": (torch.bfloat16, torch.float16),
    "x_fp64_w_fp16": (torch.float64, torch.float16),
}


@pytest.mark.parametrize("with_keep", [False, True], ids=["all_patches", "keep"])
@pytest.mark.parametrize("mixed", MIXED)
def test_kernels_round_the_patches_of_x_to_the_weight_dtype(backend, device, mixed, with_keep):
    """Any pair of floating dtypes: the patches read are rounded to the weight's dtype, the output
    and grad_weight are in the weight's dtype and grad_x in x's, as the reference computes them."""
    x_dtype, w_dtype = MIXED[mixed]
    c = CASES["2d_c3"]
    inputs = make_inputs(c, "keep_bias_pos" if with_keep else "bias_pos", torch.float32, device)
    x = inputs["x"].to(x_dtype)
    weight, bias, pos = (inputs[k].to(w_dtype) for k in ("weight", "bias", "pos"))
    ours, ref = _backends.module(backend), reference_kernels
    out = ours.patch_embed_forward(x, weight, bias, pos, inputs["keep"], c.patch)
    want = ref.patch_embed_forward(x, weight, bias, pos, inputs["keep"], c.patch)
    assert out.dtype == w_dtype
    # the coarser of the two dtypes: a backend may round grad_x to the weight's dtype on its way to x's
    coarse = max((x_dtype, w_dtype), key=lambda d: TOLERANCES[d][0])
    assert_close(out, want, dtype=w_dtype, what=f"{backend} {mixed} forward")
    grad_out = torch.randn(out.shape, device=device).to(w_dtype)
    grad_x, grad_w = ours.patch_embed_backward(grad_out, x, weight, inputs["keep"], c.patch, True, True)
    want_x, want_w = ref.patch_embed_backward(grad_out, x, weight, inputs["keep"], c.patch, True, True)
    assert (grad_x.dtype, grad_w.dtype) == (x_dtype, w_dtype)
    assert_close(grad_x, want_x, dtype=coarse, what=f"{backend} {mixed} grad_x")
    assert_close(grad_w, want_w, dtype=w_dtype, what=f"{backend} {mixed} grad_weight")


@pytest.mark.parametrize("x_dtype, half", [
    pytest.param(torch.float32, torch.bfloat16, id="x_fp32-bf16_autocast"),
    pytest.param(torch.float32, torch.float16, id="x_fp32-fp16_autocast"),
    pytest.param(torch.float16, torch.bfloat16, id="x_fp16-bf16_autocast"),
])
def test_autocast_keeps_no_half_precision_copy_of_the_input(backend, device, x_dtype, half):
    """Under autocast the op reads x as it is: what it saves for backward is x itself, not a bf16
    (or fp16) copy of the whole input (with keep, the patches not kept are never read at all)."""
    c = CASES["3d_c2"]
    inputs = with_grad(make_inputs(c, "keep_bias_pos", torch.float32, device))
    inputs["x"] = inputs["x"].detach().to(x_dtype).requires_grad_(True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autocast(device.type, dtype=half), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = embed(inputs, c, backend)
    x = inputs["x"]
    assert out.dtype == half
    assert not [t for t in saved if t.shape == x.shape and t.dtype != x.dtype], "a converted copy of x was saved"
    assert any(t.data_ptr() == x.data_ptr() for t in saved), "x itself is not what backward reads"
    out.float().sum().backward()
    assert x.grad.dtype == x_dtype and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("bad, message", [
    ({"x": torch.zeros(2, 1, 10)}, "not divisible by the patch size 4"),
    ({"x": torch.zeros(2, 8)}, "1 to 3 spatial dims"),
    ({"weight": torch.zeros(5, 7)}, r"weight must be \(E, C·p\^k\)"),
    ({"bias": torch.zeros(4)}, r"bias must be \(5,\)"),
    ({"pos": torch.zeros(3, 5)}, r"pos must be \(L, E\) = \(2, 5\)"),
    ({"keep": torch.zeros(2, 1, dtype=torch.int32)}, "keep must be"),
], ids=["indivisible", "no_spatial_dim", "weight_shape", "bias_shape", "pos_shape", "keep_dtype"])
def test_rejects_bad_shapes_with_a_clear_message(bad, message):
    args = {"x": torch.zeros(2, 1, 8), "weight": torch.zeros(5, 4), "bias": torch.zeros(5), "pos": torch.zeros(2, 5),
            "keep": None, **bad}
    with pytest.raises(ValueError, match=message):
        patch_embed(args["x"], args["weight"], args["bias"], args["pos"], args["keep"], patch=4)


# Every patch of a 16-bit 2-D / 3-D input goes through the Triton TMA kernel on sm_90+ GPUs and in the
# interpreter (kernels.patch_embed._tma_plan): shapes whose tiles hold 64+ patches on the GPU, 16 here
# (one sample of the 3-D ones: the interpreter is slow)
TMA_CASES = {
    "3d_c2_p4": PatchCase(1, 2, (16, 32, 32), 4, 24),
    "2d_c3_p8": PatchCase(2, 3, (64, 64), 8, 40),
    "3d_c1_p16": PatchCase(1, 1, (64, 64, 64), 16, 16),
    # two samples of two depth tiles each: where x's planes and grad_out's rows of sample 1 begin
    "3d_b2_c2_p4": PatchCase(2, 2, (16, 32, 32), 4, 24),
}
# grad_weight's split over the patch tiles → (patch tiles, splits) in the interpreter (tiles of 16
# patches) and on a GPU (tiles of 64+; None: no TMA plan there): one tile (one split, the result written
# directly), three (two splits of 2 and 1), and 8 tiles of 128 patches on a GPU (64 of 16 here), two splits
GRAD_SPLIT_CASES = {
    "one_tile": (PatchCase(1, 1, (16, 64), 8, 16), (1, 1), None),
    "three_tiles": (PatchCase(1, 1, (48, 64), 8, 32), (3, 2), None),
    "gpu_eight_tiles": (PatchCase(4, 2, (16, 32, 32), 4, 24), (64, 2), (8, 2)),
}


#: the Triton backend's name in the ids of the tests below: tools/gpu_validated.py counts their GPU
#: verdicts for ("triton", "patch_embed")
ONLY_TRITON = pytest.mark.parametrize("triton_backend", ["triton"])


def triton_kernels(device: torch.device):
    reason = backend_skip_reason("triton", device, FAMILIES)
    if reason:
        pytest.skip(reason)
    kernels = _backends.module("triton")
    if device.type == "cuda" and not kernels.patch_embed.tma_capable(torch.empty(0, device=device)):
        pytest.skip("the TMA kernel needs an sm_90+ GPU")
    return kernels


@pytest.mark.parametrize("half", HALF_DTYPES)
@pytest.mark.parametrize("variant", ["plain", "bias_pos"])
@pytest.mark.parametrize("case", TMA_CASES)
@ONLY_TRITON
def test_tma_forward_of_every_patch_is_no_worse_than_plain_torch(triton_backend, device, case, variant, half):
    kernels = triton_kernels(device)
    c = TMA_CASES[case]
    inputs = as_dtype(make_inputs(c, variant, torch.float32, device), half)
    geo = kernels.patch_embed.patch_geometry(inputs["x"], c.patch)
    plan = kernels.patch_embed._tma_plan(inputs["x"], inputs["weight"], None, geo, None)
    assert plan is not None, f"{case}: the TMA kernel no longer takes this input"
    out = embed(inputs, c, "triton")
    assert out.shape == (c.batch, c.tokens, c.embed) and out.dtype == half
    assert_no_worse_than_torch(out, embed_reference(inputs, c), embed_reference(as_dtype(inputs, torch.float32), c),
                               what=f"triton TMA {case} {variant}")
    if device.type == "cpu":  # the interpreter sums in the same order in both kernels: the same bits
        gather = kernels.patch_embed_forward(inputs["x"], inputs["weight"], inputs["bias"], inputs["pos"], None,
                                             c.patch, config=kernels.patch_embed._gemm_config(half))
        assert torch.equal(out, gather)


def tma_grad_weight(kernels, inputs: dict, patch: int, grad_out: torch.Tensor, config: dict | None = None):
    """grad_weight through the TMA kernel (asserting that it takes the input) and, for comparison,
    what plain PyTorch gives in the same dtype and in fp32."""
    x, w = inputs["x"], inputs["weight"]
    plan = kernels.patch_embed._grad_weight_tma_plan(grad_out, x, w, None, kernels.patch_embed.patch_geometry(x, patch),
                                                     config)
    assert plan is not None, "the TMA grad_weight kernel no longer takes this input"
    ours = kernels.patch_embed_backward(grad_out, x, w, None, patch, False, True, config=config)[1]
    plain = reference_kernels.patch_embed_backward(grad_out, x, w, None, patch, False, True)[1]
    fp32 = reference_kernels.patch_embed_backward(grad_out.float(), x.float(), w.float(), None, patch, False, True)[1]
    return ours, plain, fp32, plan


@pytest.mark.parametrize("half", HALF_DTYPES)
@pytest.mark.parametrize("case", TMA_CASES)
@ONLY_TRITON
def test_tma_grad_weight_of_every_patch_is_no_worse_than_plain_torch(triton_backend, device, case, half):
    """grad_weight = grad_outᵀ · patches with both operands loaded as TMA boxes, split over the patch
    tiles (two splits in the interpreter): no worse than plain PyTorch in that dtype."""
    kernels = triton_kernels(device)
    c = TMA_CASES[case]
    inputs = as_dtype(make_inputs(c, "plain", torch.float32, device), half)
    grad_out = torch.randn(c.batch, c.tokens, c.embed, device=device).to(half)
    ours, plain, fp32, _ = tma_grad_weight(kernels, inputs, c.patch, grad_out)
    assert ours.shape == (c.embed, c.features) and ours.dtype == half
    assert_no_worse_than_torch(ours, plain, fp32, what=f"triton TMA grad_weight {case}")
    gather = kernels.patch_embed_backward(grad_out, inputs["x"], inputs["weight"], None, c.patch, False, True,
                                          config={"TMA": False})[1]
    assert_no_worse_than_torch(gather, plain, fp32, what=f"triton gather grad_weight {case}")


@ONLY_TRITON
def test_the_tma_shapes_take_the_tma_kernels_on_a_gpu_too(triton_backend, monkeypatch):
    """The plans an sm_90 GPU with 132 SMs would make (meta tensors, no interpreter): every shape of
    ``TMA_CASES`` and the GPU split case take both TMA kernels there, so their GPU runs test those
    kernels instead of failing on a missing plan; the interpreter-only split cases do not."""
    kernels = triton_kernels(torch.device("cpu"))
    pe = kernels.patch_embed
    monkeypatch.setattr(pe, "interpreting", lambda: False)
    monkeypatch.setattr(pe, "tma_capable", lambda t: True)
    monkeypatch.setattr(pe, "num_sms", lambda t: 132)
    cases = {**TMA_CASES, **{name: c for name, (c, _, _) in GRAD_SPLIT_CASES.items()}}
    for name, c in cases.items():
        x = torch.empty(c.batch, c.channels, *c.spatial, dtype=torch.bfloat16, device="meta")
        w = torch.empty(c.embed, c.features, dtype=torch.bfloat16, device="meta")
        go = torch.empty(c.batch, c.tokens, c.embed, dtype=torch.bfloat16, device="meta")
        geo = pe.patch_geometry(x, c.patch)
        plans = pe._tma_plan(x, w, None, geo, None), pe._grad_weight_tma_plan(go, x, w, None, geo, None)
        on_gpu = name in TMA_CASES or GRAD_SPLIT_CASES[name][2] is not None
        assert all((plan is not None) == on_gpu for plan in plans), f"{name}: {plans}"


@pytest.mark.parametrize("case", GRAD_SPLIT_CASES)
@ONLY_TRITON
def test_tma_grad_weight_split_over_patch_tiles(triton_backend, device, case):
    """The fixed-order sum of the splits' partials, a split with fewer tiles than the others, and one
    split written straight into the result."""
    kernels = triton_kernels(device)
    pe = kernels.patch_embed
    c, interpreted, on_gpu = GRAD_SPLIT_CASES[case]
    want = on_gpu if device.type == "cuda" else interpreted
    if want is None:
        pytest.skip("tiles of 16 patches: the TMA kernel takes them in the interpreter only")
    inputs = as_dtype(make_inputs(c, "plain", torch.float32, device), torch.bfloat16)
    grad_out = torch.randn(c.batch, c.tokens, c.embed, device=device).to(torch.bfloat16)
    ours, plain, fp32, plan = tma_grad_weight(kernels, inputs, c.patch, grad_out)
    geo = pe.patch_geometry(inputs["x"], c.patch)
    patch_tiles = pe._patch_tiles(geo, c.batch, plan["BD"], plan["BH"], plan["BX"])
    tiles = -(-c.embed // plan["BLOCK_N"]) * (c.features // (plan["BJ"] * geo["PW"]))
    splits = pe._splits(patch_tiles, tiles, inputs["x"])
    assert (patch_tiles, splits) == want
    assert_no_worse_than_torch(ours, plain, fp32, what=f"TMA grad_weight, {patch_tiles} tiles in {splits} splits")


@ONLY_TRITON
def test_a_grad_out_of_another_shape_is_refused(triton_backend, device):
    """grad_out must be (B, N, E): a shorter one would be read past its end by the TMA kernel."""
    kernels = triton_kernels(device)
    c = TMA_CASES["2d_c3_p8"]
    inputs = as_dtype(make_inputs(c, "plain", torch.float32, device), torch.bfloat16)
    short = torch.zeros(c.batch, c.tokens // 2, c.embed, device=device, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=rf"grad_out must be \(B, N, E\) = \({c.batch}, {c.tokens}, {c.embed}\), got "
                                         rf"shape \({c.batch}, {c.tokens // 2}, {c.embed}\)"):
        kernels.patch_embed_backward(short, inputs["x"], inputs["weight"], None, c.patch, False, True)


@ONLY_TRITON
def test_an_empty_batch_with_a_tma_config_gives_empty_gradients(triton_backend, device):
    kernels = triton_kernels(device)
    x = torch.zeros(0, 3, 64, 64, device=device, dtype=torch.bfloat16)
    w = torch.zeros(40, 192, device=device, dtype=torch.bfloat16)
    go = torch.zeros(0, 64, 40, device=device, dtype=torch.bfloat16)
    gx, gw = kernels.patch_embed_backward(go, x, w, None, 8, True, True, config={"TMA": True})
    assert gx.shape == x.shape and torch.equal(gw, torch.zeros_like(w))


@pytest.mark.parametrize("case, config, spans", [
    (PatchCase(1, 2, (32, 16, 32), 4, 24), {"TMA": True, "BLOCK_M": 64, "BLOCK_N": 16, "num_warps": 4}, "depth planes"),
    (PatchCase(1, 1, (64, 128), 8, 16), None, "column boxes"),
], ids=["two_depth_planes", "two_column_boxes"])
@ONLY_TRITON
def test_tma_tiles_spanning_depth_planes_and_boxes_along_a_row(triton_backend, device, case, config, spans):
    """Tiles of two patch planes along depth (``BD`` = 2), and rows of x wider than one box (``BX`` < W,
    several boxes along a row), each patch in its place."""
    kernels = triton_kernels(device)
    inputs = as_dtype(make_inputs(case, "bias_pos", torch.float32, device), torch.bfloat16)
    args = (inputs["x"], inputs["weight"], inputs["bias"], inputs["pos"], None, case.patch)
    plan = kernels.patch_embed._tma_plan(inputs["x"], inputs["weight"], None,
                                         kernels.patch_embed.patch_geometry(inputs["x"], case.patch), config)
    assert plan is not None and (plan["BD"] >= 2 if spans == "depth planes" else case.spatial[-1] // plan["BX"] >= 2)
    out = kernels.patch_embed_forward(*args, config=config)
    assert_no_worse_than_torch(out, patch_embed_reference(*args),
                               patch_embed_reference(*as_dtype(dict(zip("xwbp", args[:4])), torch.float32).values(),
                                                     None, case.patch), what=spans)
    # grad_weight: the same boxes, and grad_out's rows of each loaded as one (BD, BH, NW, E) box
    grad_out = torch.randn(case.batch, case.tokens, case.embed, device=device).to(torch.bfloat16)
    ours, plain, fp32, grad_plan = tma_grad_weight(kernels, inputs, case.patch, grad_out, config)
    assert {k: grad_plan[k] for k in ("BD", "BH", "BX")} == {k: plan[k] for k in ("BD", "BH", "BX")}
    assert_no_worse_than_torch(ours, plain, fp32, what=f"grad_weight, {spans}")


@ONLY_TRITON
def test_a_tma_tile_width_that_is_no_power_of_two_is_refused(triton_backend, device):
    kernels = triton_kernels(device)
    c = TMA_CASES["3d_c2_p4"]
    i = as_dtype(make_inputs(c, "plain", torch.float32, device), torch.bfloat16)
    with pytest.raises(ValueError, match="the TMA kernel's BLOCK_N must be a power of two from 16 to 256, got 48"):
        kernels.patch_embed_forward(i["x"], i["weight"], None, None, None, c.patch, config={"TMA": True, "BLOCK_N": 48})


@ONLY_TRITON
def test_a_triton_older_than_the_tma_kernel_knows_keeps_the_gather_kernel(triton_backend, device, monkeypatch):
    """Host-side descriptors and ``desc.load`` changed before triton 3.6 (torch 2.11): with an older
    triton every patch goes through the gather kernel, with the same result."""
    kernels = triton_kernels(device)
    pe = kernels.patch_embed
    c = TMA_CASES["2d_c3_p8"]
    inputs = as_dtype(make_inputs(c, "bias_pos", torch.float32, device), torch.bfloat16)
    monkeypatch.setattr(pe.triton, "__version__", "3.5.1")
    pe.triton_has_tma.cache_clear()
    try:
        assert not pe.tma_capable(inputs["x"])
        assert pe._tma_plan(inputs["x"], inputs["weight"], None, pe.patch_geometry(inputs["x"], c.patch), None) is None
        assert_no_worse_than_torch(embed(inputs, c, "triton"), embed_reference(inputs, c),
                                   embed_reference(as_dtype(inputs, torch.float32), c), what="gather, triton 3.5")
    finally:
        pe.triton_has_tma.cache_clear()  # (asked again after the real version is back)


@ONLY_TRITON
def test_tma_forward_feeds_the_same_gradients_as_plain_torch(triton_backend, device):
    kernels = triton_kernels(device)
    c = TMA_CASES["3d_c2_p4"]
    base = as_dtype(make_inputs(c, "bias_pos", torch.float32, device), torch.bfloat16)
    ours, plain, ref = with_grad(base), with_grad(base), with_grad(as_dtype(base, torch.float32))
    g = torch.randn(c.batch, c.tokens, c.embed, device=device).to(torch.bfloat16)
    embed(ours, c, "triton").backward(g)
    embed_reference(plain, c).backward(g)
    embed_reference(ref, c).backward(g.float())
    for name in ("x", "weight", "bias", "pos"):
        assert_no_worse_than_torch(grads(ours)[name], grads(plain)[name], grads(ref)[name], what=f"TMA grad {name}")
    assert kernels.patch_embed._tma_plan(base["x"], base["weight"], None,
                                         kernels.patch_embed.patch_geometry(base["x"], c.patch), None)


def _misaligned(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values in a tensor whose data starts 2 bytes past a 16-byte boundary."""
    buf = torch.empty(x.numel() + 1, dtype=x.dtype, device=x.device)
    out = buf[1:].view(x.shape)
    out.copy_(x)
    return out


@pytest.mark.parametrize("what", ["keep", "fp32", "fp32_x_bf16_weight", "1d", "misaligned", "patch_not_power_of_2",
                                  "tile_too_small"])
@ONLY_TRITON
def test_inputs_the_tma_kernel_does_not_take_go_to_the_gather_kernel(triton_backend, device, what):
    """The gather GEMM embeds them, with the same result; a config that asks for the TMA kernel there
    is refused. (Kernel-level calls, which take contiguous tensors: the op makes them so.)"""
    kernels = triton_kernels(device)
    c = TMA_CASES["3d_c2_p4"]
    inputs = as_dtype(make_inputs(c, "keep_bias_pos" if what == "keep" else "bias_pos", torch.float32, device),
                      torch.bfloat16)
    patch = c.patch
    if what == "fp32":
        inputs = as_dtype(inputs, torch.float32)
    elif what == "fp32_x_bf16_weight":  # what autocast hands the op
        inputs["x"] = inputs["x"].float()
    elif what == "1d":
        inputs["x"] = inputs["x"].reshape(c.batch, c.channels, -1)[..., :1024].contiguous()
        inputs["weight"], inputs["pos"] = inputs["weight"][:, :8].contiguous(), inputs["pos"][:256]
        patch = 4
    elif what == "misaligned":
        inputs["x"] = _misaligned(inputs["x"])
    elif what == "patch_not_power_of_2":
        inputs["x"] = torch.randn(1, 1, 24, 24, device=device).to(torch.bfloat16)
        inputs["weight"], inputs["pos"], patch = inputs["weight"][:, :36].contiguous(), inputs["pos"][:16], 6
    elif what == "tile_too_small":
        inputs["x"] = inputs["x"][:, :, :4, :8, :8].contiguous()
        inputs["pos"] = inputs["pos"][:4]
    x, w = inputs["x"], inputs["weight"]
    args = (x, w, inputs["bias"], inputs["pos"], inputs["keep"], patch)
    assert kernels.patch_embed._tma_plan(x, w, inputs["keep"], kernels.patch_embed.patch_geometry(x, patch),
                                         None) is None
    out = kernels.patch_embed_forward(*args)
    assert_close(out, patch_embed_reference(*args), dtype=torch.bfloat16 if w.dtype == torch.bfloat16 else None,
                 what=what)
    with pytest.raises(ValueError, match="config asks for the TMA kernel, which does not apply"):
        kernels.patch_embed_forward(*args, config={"TMA": True})
    # grad_weight alike
    grad_out = torch.randn(*out.shape, device=device).to(w.dtype)
    assert kernels.patch_embed._grad_weight_tma_plan(grad_out, x, w, inputs["keep"],
                                                     kernels.patch_embed.patch_geometry(x, patch), None) is None
    _, gw = kernels.patch_embed_backward(grad_out, x, w, inputs["keep"], patch, False, True)
    _, want = reference_kernels.patch_embed_backward(grad_out.double(), x.double(), w.double(), inputs["keep"], patch,
                                                     False, True)
    assert_close(gw, want, dtype=torch.bfloat16 if w.dtype == torch.bfloat16 else None, what=f"grad_weight, {what}")
    with pytest.raises(ValueError, match="config asks for the TMA kernel, which does not apply to grad_weight"):
        kernels.patch_embed_backward(grad_out, x, w, inputs["keep"], patch, False, True, config={"TMA": True})


@pytest.mark.parametrize("what", ["rows_not_16_bytes", "misaligned"])
@ONLY_TRITON
def test_a_grad_out_the_tma_grad_weight_kernel_does_not_take_goes_to_the_gather_kernel(triton_backend, device, what):
    """grad_out's rows are a TMA box's innermost dimension: with E·2 bytes no multiple of 16, or grad_out
    not 16-byte aligned, grad_weight gathers (the forward's TMA kernel still takes the input)."""
    kernels = triton_kernels(device)
    c = TMA_CASES["3d_c2_p4"]
    c = PatchCase(c.batch, c.channels, c.spatial, c.patch, 20 if what == "rows_not_16_bytes" else c.embed)
    inputs = as_dtype(make_inputs(c, "plain", torch.float32, device), torch.bfloat16)
    x, w = inputs["x"], inputs["weight"]
    geo = kernels.patch_embed.patch_geometry(x, c.patch)
    grad_out = torch.randn(c.batch, c.tokens, c.embed, device=device).to(torch.bfloat16)
    if what == "misaligned":
        grad_out = _misaligned(grad_out)
    assert kernels.patch_embed._tma_plan(x, w, None, geo, None) is not None
    assert kernels.patch_embed._grad_weight_tma_plan(grad_out, x, w, None, geo, None) is None
    _, gw = kernels.patch_embed_backward(grad_out, x, w, None, c.patch, False, True)
    plain = reference_kernels.patch_embed_backward(grad_out, x, w, None, c.patch, False, True)[1]
    fp32 = reference_kernels.patch_embed_backward(grad_out.float(), x.float(), w.float(), None, c.patch, False, True)[1]
    assert_no_worse_than_torch(gw, plain, fp32, what=what)


def test_tile_sweep_tool_dry_runs_and_checks_every_configuration(tmp_path):
    """tools/patch_embed_sweep.py (a GPU measurement) on CPU tensors under the Triton interpreter:
    every configuration is checked against F.linear of the patchified input before it is timed."""
    import json

    reason = backend_skip_reason("triton", torch.device("cpu"), ["patch_embed"])
    if reason:
        pytest.skip(reason)
    tool = tool_module("patch_embed_sweep")
    assert tool.main(["--device", "cpu", "--size", "tiny", "--json", str(tmp_path / "sweep.json")]) == 0
    records = json.loads((tmp_path / "sweep.json").read_text())["records"]
    triton_runs = [r for r in records if r["impl"] == "triton"]
    # forward: the gather configurations for every patch and the kept half, the TMA ones for every
    # patch; grad_weight of every patch: its TMA configurations and the gather kernel
    assert len(triton_runs) == 2 * len(tool.TINY_CONFIGS) + len(tool.TINY_TMA_CONFIGS) + len(tool.TINY_GRAD_CONFIGS)
    by_case = {case: [r["config"] for r in triton_runs if r["case"] == case and r["config"].get("TMA")]
               for case in ("all", "keep50", "grad_weight")}
    assert by_case == {"all": tool.TINY_TMA_CONFIGS, "keep50": [],
                       "grad_weight": [c for c in tool.TINY_GRAD_CONFIGS if c["TMA"]]}
    assert [r["config"] for r in triton_runs if r["case"] == "grad_weight"][-1] == {"TMA": False}
    assert all(r["plan"]["BD"] * r["plan"]["BH"] * r["plan"]["BX"] // 4 == r["config"]["BLOCK_M"]
               for r in triton_runs if r["config"].get("TMA"))  # the tiles the kernel ran (patch 4)
    # forward: F.linear rounds to bf16 as the kernels do; grad_weight: against the fp32 sum, one bf16 rounding
    assert all(r["max_rel_err"] < (8e-3 if r["case"] == "grad_weight" else 1e-4) and r["median_ms"] > 0
               for r in triton_runs)


def test_empty_batch_gives_zero_gradients_to_weight_and_positions(backend, device):
    x = torch.randn(0, 2, 4, 4, device=device)
    w = torch.randn(5, 8, device=device, requires_grad=True)
    pos = torch.randn(4, 5, device=device, requires_grad=True)
    out = patch_embed(x, w, None, pos, patch=2, backend=backend)
    assert out.shape == (0, 4, 5)
    gw, gpos = torch.autograd.grad(out.sum(), (w, pos))
    assert torch.equal(gw, torch.zeros_like(w)) and torch.equal(gpos, torch.zeros_like(pos))


def test_integer_input_is_embedded_as_numbers_in_the_weight_dtype(backend, device):
    """uint8 pixels: the result is conv(x.float()), in the weight's dtype — the weight was cast to
    x's integer dtype (truncated to garbage) by the reference and Triton backends, refused by ext."""
    x = torch.randint(0, 256, (2, 2, 4, 4), dtype=torch.uint8).to(device)
    w = torch.randn(5, 8).to(device)
    bias = torch.randn(5).to(device)
    expected = nn.functional.conv2d(x.float(), w.view(5, 2, 2, 2), bias, stride=2).flatten(2).transpose(1, 2)
    out = patch_embed(x, w, bias, patch=2, backend=backend)
    assert out.dtype == torch.float32
    assert_close(out, expected, what=f"{backend}: uint8 input")


@pytest.mark.parametrize("bad", [-1, 4, 4_000_000])
def test_keep_outside_the_patch_grid_is_refused_naming_the_entry(backend, bad):
    """An out-of-range keep id was a segmentation fault (Triton), a bare index error (reference)."""
    x, w, pos = torch.randn(2, 2, 4, 4), torch.randn(5, 8), torch.randn(4, 5)
    keep = torch.tensor([[0, 3], [2, bad]])
    with pytest.raises(ValueError, match=rf"keep\[1, 1\] = {bad} is outside \[0, 4\) \(the patch grid of input "
                                         r"\(2, 2, 4, 4\) with patch 2 has 4 patches\)"):
        patch_embed(x, w, None, pos, keep, patch=2, backend=backend)


@pytest.mark.parametrize("name", ["weight", "bias", "pos", "keep"])
def test_an_argument_on_another_device_is_refused_by_name(name):
    args = {"x": torch.randn(2, 2, 4, 4), "weight": torch.randn(5, 8), "bias": torch.randn(5),
            "pos": torch.randn(4, 5), "keep": torch.tensor([[0, 1], [2, 3]])}
    args[name] = args[name].to("meta")
    with pytest.raises(ValueError, match=rf"{name} is on meta but x is on cpu: move it there \({name}.to\('cpu'\)\)"):
        patch_embed(*args.values(), patch=2)


@pytest.mark.parametrize("name", ["reference", "ext"])
def test_a_patch_kept_twice_gets_the_sum_of_both_gradients(name):
    """The gradient of the spec's gather is a scatter-add. The reference backend (the fallback on every
    device) overwrote instead: one row's gradient, which one undefined. (The GPU kernels document
    that they keep one row: select_keep never repeats an id.)"""
    reason = backend_skip_reason(name, torch.device("cpu"), FAMILIES)
    if reason:
        pytest.skip(reason)
    inputs = with_grad({"x": torch.randn(2, 2, 4, 4, dtype=torch.float64),
                        "weight": torch.randn(5, 8, dtype=torch.float64)})
    keep = torch.tensor([[0, 0, 1], [3, 2, 3]])
    expected = with_grad(inputs)
    patch_embed(inputs["x"], inputs["weight"], keep=keep, patch=2, backend=name).pow(2).sum().backward()
    patch_embed_reference(expected["x"], expected["weight"], None, None, keep, 2).pow(2).sum().backward()
    for key in ("x", "weight"):
        assert_close(inputs[key].grad, expected[key].grad, what=f"{name}: grad {key}")


def test_patch_size_may_be_any_integer_and_a_float_is_refused(backend):
    """A numpy integer (from a config read with numpy) failed inside the Triton kernels; a float
    patch size failed deep in reshape or the op schema."""
    import numpy as np

    x, w = torch.randn(2, 2, 4, 4), torch.randn(5, 8)
    expected = patch_embed_reference(x, w, None, None, None, 2)
    for patch in (np.int64(2), torch.tensor(2)):
        assert_close(patch_embed(x, w, patch=patch, backend=backend), expected, what=f"{backend}: patch={patch!r}")
    with pytest.raises(TypeError, match=r"patch size must be an integer, got 2\.0 \(float\)"):
        patch_embed(x, w, patch=2.0, backend=backend)

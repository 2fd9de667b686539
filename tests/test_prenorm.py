"""The memory-lean pre-norm sublayers (pyimputmae.model.prenorm) against plain autograd:
the same outputs and gradients in every dtype mode, and less kept for backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pyimputmae.model.layers import Block
from pyimputmae.model.prenorm import norm_linear, norm_mlp

D, MLP = 32, 96


def _sublayers(dtype: torch.dtype = torch.float32, seed: int = 0):
    """A LayerNorm and two Linears with random (not initial) affine parameters."""
    torch.manual_seed(seed)
    norm, fc1, fc2 = nn.LayerNorm(D), nn.Linear(D, MLP), nn.Linear(MLP, D)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    return norm.to(dtype), fc1.to(dtype), fc2.to(dtype)


def _plain_mlp(x, norm, fc1, fc2, mm_dtype=None):
    """The autograd path, with the lean path's dtypes: LayerNorm in float32, matmuls in ``mm_dtype``."""
    if mm_dtype is None:
        return fc2(F.gelu(fc1(norm(x))))
    xn = F.layer_norm(x.float(), (D,), norm.weight.float(), norm.bias.float(), norm.eps).to(mm_dtype)
    h = F.linear(xn, fc1.weight.to(mm_dtype), fc1.bias.to(mm_dtype))
    return F.linear(F.gelu(h), fc2.weight.to(mm_dtype), fc2.bias.to(mm_dtype))


def _grads(out, x, params, grad_out):
    return torch.autograd.grad(out, [x, *params], grad_out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("shape", [(5, D), (2, 7, D)], ids=["2d", "3d"])
def test_norm_mlp_and_norm_linear_equal_the_autograd_path(dtype, shape):
    norm, fc1, fc2 = _sublayers(dtype)
    params = [*norm.parameters(), *fc1.parameters(), *fc2.parameters()]
    x = torch.randn(shape, dtype=dtype, requires_grad=True)
    out, ref = norm_mlp(x, norm, fc1, fc2), _plain_mlp(x, norm, fc1, fc2)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out, ref)
    g_out = torch.randn_like(ref)
    for got, want, name in zip(_grads(out, x, params, g_out), _grads(ref, x, params, g_out),
                               ["x", "norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, msg=lambda m, name=name: f"grad of {name}: {m}")

    lin_params = [*norm.parameters(), *fc1.parameters()]
    out, ref = norm_linear(x, norm, fc1), fc1(norm(x))
    torch.testing.assert_close(out, ref)
    g_out = torch.randn_like(ref)
    for got, want in zip(_grads(out, x, lin_params, g_out), _grads(ref, x, lin_params, g_out)):
        torch.testing.assert_close(got, want)


def test_gradcheck_fp64():
    norm, fc1, fc2 = _sublayers(torch.float64)
    x = torch.randn(2, 3, D, dtype=torch.float64, requires_grad=True)
    w = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    assert torch.autograd.gradcheck(
        lambda x, nw, nb, *w: norm_mlp(x, _with(norm, nw, nb), _with(fc1, *w[:2]), _with(fc2, *w[2:])),
        (x, norm.weight, norm.bias, *w))
    assert torch.autograd.gradcheck(lambda x, nw, nb, w, b: norm_linear(x, _with(norm, nw, nb), _with(fc1, w, b)),
                                    (x, norm.weight, norm.bias, fc1.weight, fc1.bias))


def _with(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    """A shallow stand-in for ``module`` whose weight and bias are the given tensors (for gradcheck)."""
    stand_in = type("StandIn", (), {})()
    stand_in.weight, stand_in.bias, stand_in.eps = weight, bias, getattr(module, "eps", None)
    return stand_in


def test_bf16_autocast_matmuls_in_bf16_with_float32_norm_and_float32_parameter_grads():
    """Under autocast: the output in bf16; the parameters' gradients in their own float32; the values
    those of the same computation written with autograd (LayerNorm float32, matmuls bf16)."""
    norm, fc1, fc2 = _sublayers()
    params = [*norm.parameters(), *fc1.parameters(), *fc2.parameters()]
    x = torch.randn(4, 9, D, dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm_mlp(x, norm, fc1, fc2)
    ref = _plain_mlp(x, norm, fc1, fc2, mm_dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # the same operations in the same dtypes
    g_out = torch.randn_like(ref)
    got, want = _grads(out, x, params, g_out), _grads(ref, x, params, g_out)
    assert [g.dtype for g in got] == [torch.bfloat16] + [torch.float32] * 6
    for g, w in zip(got, want):
        # the bias gradients are summed in float32 here and rounded to bf16 first in the autograd path
        torch.testing.assert_close(g.float(), w.float(), atol=2e-2, rtol=2e-2)


def _saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd keeps for backward while running ``fn()``, except
    those of parameters (``nn.Parameter``) and of the input (which require grad as leaves)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (isinstance(t, nn.Parameter) or (t.is_leaf and t.requires_grad)):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_block_keeps_only_its_input_and_the_mlp_preactivation_beyond_attention():
    """A block's saved bytes: the lean path keeps, per token, the MLP pre-activation (MLP values)
    and, for attention, qkv, its output and the residual after attention, with no normalised copies
    or GELU output; in training with dropout the plain path keeps those too."""
    torch.manual_seed(0)
    B, N = 4, 16
    block = Block(D, 4, MLP, dropout=0.1)
    x = torch.randn(B, N, D, requires_grad=True)
    block.eval()  # no dropout: the lean path (autograd is on: eval only switches dropout off)
    lean = _saved_bytes(lambda: block(x))
    block.train()
    plain = _saved_bytes(lambda: block(x))
    values = B * N * 4  # bytes per float32 value per token
    assert lean < plain
    # the plain path also keeps 2 normalised inputs (2·D), the GELU output (MLP) and its dropout mask
    assert plain - lean >= values * (2 * D + MLP)


def test_block_under_dropout_in_training_still_drops():
    torch.manual_seed(0)
    block = Block(D, 4, MLP, dropout=0.5).train()
    x = torch.randn(2, 5, D)
    assert not torch.equal(block(x), block(x)), "dropout should make two training calls differ"
    block.eval()
    torch.testing.assert_close(block(x), block(x))


def test_norm_mlp_compiles_without_graph_breaks():
    torch._dynamo.reset()
    norm, fc1, fc2 = _sublayers()
    x = torch.randn(3, 5, D, requires_grad=True)
    compiled = torch.compile(lambda x: norm_mlp(x, norm, fc1, fc2).sum() + norm_linear(x, norm, fc1).sum(),
                             fullgraph=True, backend="aot_eager")
    loss = compiled(x)
    (gx,) = torch.autograd.grad(loss, x)
    eager = norm_mlp(x, norm, fc1, fc2).sum() + norm_linear(x, norm, fc1).sum()
    (gx_ref,) = torch.autograd.grad(eager, x)
    torch.testing.assert_close(loss, eager)
    torch.testing.assert_close(gx, gx_ref)


def test_second_order_gradient_raises_instead_of_dropping_terms():
    """norm_mlp saves fc1's output without a graph: a second-order gradient through it would silently
    miss terms, so the backwards are first-order only."""
    norm, fc1, fc2 = _sublayers(torch.float64)
    x = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(norm_mlp(x, norm, fc1, fc2).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gx.sum(), x)


@pytest.mark.parametrize("make", [lambda: (nn.LayerNorm(D, bias=False), nn.Linear(D, MLP), nn.Linear(MLP, D)),
                                  lambda: (nn.LayerNorm(D, elementwise_affine=False), nn.Linear(D, MLP),
                                           nn.Linear(MLP, D)),
                                  lambda: (nn.LayerNorm(D), nn.Linear(D, MLP, bias=False), nn.Linear(MLP, D))],
                         ids=["norm-without-bias", "norm-without-affine", "linear-without-bias"])
def test_layers_without_a_bias_or_affine_take_the_plain_path(make):
    norm, fc1, fc2 = make()
    x = torch.randn(2, 5, D, requires_grad=True)
    torch.testing.assert_close(norm_mlp(x, norm, fc1, fc2), fc2(F.gelu(fc1(norm(x)))))
    torch.testing.assert_close(norm_linear(x, norm, fc1), fc1(norm(x)))

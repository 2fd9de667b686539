"""The pre-norm sublayers' LayerNorm (family ``layer_norm``): Triton's fused kernels
(``kernels/layer_norm.py``) against the reference backend's PyTorch, and how the sublayers choose.

Triton runs here on CPU tensors under the interpreter (conftest sets it when no GPU is present), and
on CUDA tensors on a GPU machine (``tools/gpu_check.sh`` runs this module in its op-test stage).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from op_testing import TOLERANCES, backend_skip_reason
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from pyimputmae import _backends
from pyimputmae.model.prenorm import norm_linear, norm_mlp

FAMILIES = ("layer_norm",)
EPS = 1e-5
#: (M, D): rows of a power-of-two width, several row blocks of an odd width, one wide row per program
SHAPES = [(5, 256), (37, 48), (70, 1000)]
X_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16"),
            pytest.param(torch.float16, id="fp16")]


@pytest.fixture(params=_backends.IMPLEMENTED["layer_norm"])
def backend(request: pytest.FixtureRequest, device: torch.device) -> str:
    """The backends with LayerNorm kernels (conftest's fixture would list ext and cuda_emu as skipped)."""
    if reason := backend_skip_reason(request.param, device, FAMILIES):
        pytest.skip(reason)
    return request.param


def _kernels(backend: str):
    return _backends.module(backend)


def _inputs(M: int, D: int, dtype: torch.dtype, device: torch.device):
    """x off-centre and wide (so a single-pass variance would lose digits), random affine parameters."""
    x = (torch.randn(M, D) * 3 + 5).to(dtype).to(device)
    w = (torch.randn(D) * 0.3 + 1).to(device)
    b = (torch.randn(D) * 0.3).to(device)
    return x, w, b


def _autograd(x, w, b, grad, eps=EPS):
    """The float64 ground truth: F.layer_norm of x's values and its gradients for ``grad``."""
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    out = F.layer_norm(xr, (x.shape[1],), wr, br, eps)
    out.backward(grad.double())
    return out.detach(), xr.grad, wr.grad, br.grad


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``got`` (rounded to ``dtype``) against the float64 truth, atol relative to its largest value."""
    rtol, atol = TOLERANCES[dtype]
    scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("out_dtype", [pytest.param(torch.bfloat16, id="out_bf16"),
                                       pytest.param(torch.float32, id="out_fp32")])
@pytest.mark.parametrize("dtype", X_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("eps", [EPS, 4.0], ids=["eps1e-5", "eps4"])
def test_forward_and_backward_equal_float64_layer_norm(backend, device, shape, dtype, out_dtype, eps):
    """eps = 4, about half the rows' variance (9): a kernel that left it out would be off by a third."""
    k = _kernels(backend)
    x, w, b = _inputs(*shape, dtype, device)
    grad = torch.randn(shape, device=device).to(out_dtype)
    want, gx_want, gw_want, gb_want = _autograd(x, w, b, grad, eps)
    out = k.layer_norm_forward(x, w, b, eps, out_dtype)
    assert out.dtype == out_dtype and out.shape == shape
    _close(out, want, out_dtype, "forward")
    gx, xn, gw, gb = k.layer_norm_backward(x, w, b, eps, grad, out_dtype, True, True)
    assert gx.dtype == dtype and xn.dtype == out_dtype
    assert gw.dtype == gb.dtype == torch.float32  # the LayerNorm's arithmetic; the sublayers cast them back
    torch.testing.assert_close(xn, out, rtol=0, atol=0, msg="the backward's recomputed output is the forward's")
    _close(gx, gx_want, dtype, "grad_x")
    _close(gw, gw_want, torch.float32, "grad_weight")
    _close(gb, gb_want, torch.float32, "grad_bias")


@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float32, id="fp32")])
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_equals_the_reference_backend(backend, device, dtype):
    """The same inputs through both backends: the Triton output and gradients are the reference's
    up to the rounding of one summation order."""
    x, w, b = _inputs(37, 48, dtype, device)
    grad = torch.randn(37, 48, device=device).to(torch.bfloat16)
    tri, ref = _kernels("triton"), _kernels("reference")
    torch.testing.assert_close(tri.layer_norm_forward(x, w, b, EPS, torch.bfloat16),
                               ref.layer_norm_forward(x, w, b, EPS, torch.bfloat16), rtol=8e-3, atol=8e-3)
    for got, want in zip(tri.layer_norm_backward(x, w, b, EPS, grad, torch.bfloat16, True, True),
                         ref.layer_norm_backward(x, w, b, EPS, grad, torch.bfloat16, True, True)):
        assert got.dtype == want.dtype
        rtol, atol = TOLERANCES[dtype] if got.dtype != torch.bfloat16 else (8e-3, 8e-3)
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol * max(1.0, float(want.abs().max())))


def test_rows_far_from_zero_keep_their_digits(backend, device):
    """Rows with mean 1,000 and standard deviation 1: the variance is taken of ``x − mean`` (a
    one-pass ``E[x²] − mean²`` in float32 would lose it to cancellation)."""
    k = _kernels(backend)
    x = (torch.randn(16, 256, dtype=torch.float64) + 1000).float().to(device)
    w, b = torch.ones(256, device=device), torch.zeros(256, device=device)
    grad = torch.randn(16, 256, device=device)
    want, gx_want, _, _ = _autograd(x, w, b, grad)
    torch.testing.assert_close(k.layer_norm_forward(x, w, b, EPS, torch.float32).double(), want, rtol=0, atol=1e-3)
    gx = k.layer_norm_backward(x, w, b, EPS, grad, None, True, False)[0]
    torch.testing.assert_close(gx.double(), gx_want, rtol=0, atol=1e-3)


@pytest.mark.parametrize("need_x", [False, True], ids=["no_dx", "dx"])
@pytest.mark.parametrize("need_params", [False, True], ids=["no_dwb", "dwb"])
@pytest.mark.parametrize("want_xn", [False, True], ids=["no_xn", "xn"])
def test_backward_returns_what_was_asked_and_nothing_else(backend, device, need_x, need_params, want_xn):
    k = _kernels(backend)
    x, w, b = _inputs(9, 40, torch.bfloat16, device)
    grad = torch.randn(9, 40, device=device).to(torch.bfloat16) if need_x or need_params else None
    gx, xn, gw, gb = k.layer_norm_backward(x, w, b, EPS, grad, torch.bfloat16 if want_xn else None, need_x, need_params)
    assert (gx is not None) == need_x and (xn is not None) == want_xn
    assert (gw is not None) == need_params and (gb is not None) == need_params
    full = k.layer_norm_backward(x, w, b, EPS, torch.randn(9, 40, device=device).to(torch.bfloat16) if grad is None
                                 else grad, torch.bfloat16, True, True)
    if want_xn:
        torch.testing.assert_close(xn, full[1], rtol=0, atol=0)
    if need_x:
        torch.testing.assert_close(gx, full[0], rtol=0, atol=0)
    if need_params:
        torch.testing.assert_close(gw, full[2], rtol=0, atol=0)
        torch.testing.assert_close(gb, full[3], rtol=0, atol=0)


@pytest.mark.parametrize("programs", [1, 3, 64])
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_backward_strides_its_programs_over_every_row_block(backend, device, programs):
    """Fewer programs than row blocks: each walks several blocks and sums its partials; every row's
    gradient is written and the weight gradients are the float64 ones whatever the split."""
    x, w, b = _inputs(300, 24, torch.float32, device)  # 300 rows: many row blocks of the 24-wide tile
    grad = torch.randn(300, 24, device=device)
    _, gx_want, gw_want, gb_want = _autograd(x, w, b, grad)
    gx, _, gw, gb = _kernels("triton").layer_norm_backward(x, w, b, EPS, grad, None, True, True, programs=programs)
    _close(gx, gx_want, torch.float32, "grad_x")
    _close(gw, gw_want, torch.float32, "grad_weight")
    _close(gb, gb_want, torch.float32, "grad_bias")


def test_empty_rows_and_a_single_feature(backend, device):
    k = _kernels(backend)
    x, w, b = _inputs(0, 32, torch.bfloat16, device)
    assert k.layer_norm_forward(x, w, b, EPS, torch.bfloat16).shape == (0, 32)
    gx, xn, gw, gb = k.layer_norm_backward(x, w, b, EPS, torch.empty(0, 32, device=device), torch.bfloat16, True, True)
    assert gx.shape == xn.shape == (0, 32) and float(gw.abs().sum()) == float(gb.abs().sum()) == 0
    x, w, b = _inputs(6, 1, torch.float32, device)  # one feature: x̂ = 0, the output is the bias
    torch.testing.assert_close(k.layer_norm_forward(x, w, b, EPS, torch.float32), b.expand(6, 1))
    grad = torch.randn(6, 1, device=device)
    gx, xn, gw, gb = k.layer_norm_backward(x, w, b, EPS, grad, torch.float32, True, True)
    torch.testing.assert_close(xn, b.expand(6, 1))
    torch.testing.assert_close(gx, torch.zeros_like(gx), rtol=0, atol=1e-3)  # PyTorch: rounding noise
    torch.testing.assert_close(gw, torch.zeros_like(gw), rtol=0, atol=1e-3)
    torch.testing.assert_close(gb, grad.sum(0))


# the interpreter's NumPy says so when it computes 1/0 and 0·inf on the padding rows (masked, as on a GPU)
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")
def test_eps_zero_with_a_partial_last_row_block(backend, device):
    """eps = 0 and rows that do not fill the last row block: the weight gradient stays finite (the
    padding rows have variance 0, so an unmasked 1/sqrt(var + eps) is infinite there)."""
    k = _kernels(backend)
    x, w, b = _inputs(9, 40, torch.float32, device)
    grad = torch.randn(9, 40, device=device)
    _, gx_want, gw_want, gb_want = _autograd(x, w, b, grad, 0.0)
    gx, _, gw, gb = k.layer_norm_backward(x, w, b, 0.0, grad, None, True, True)
    _close(gx, gx_want, torch.float32, "grad_x")
    _close(gw, gw_want, torch.float32, "grad_weight")
    _close(gb, gb_want, torch.float32, "grad_bias")


@pytest.mark.parametrize("param_dtype", [pytest.param(torch.bfloat16, id="bf16_params"),
                                         pytest.param(torch.float16, id="fp16_params")])
def test_parameters_gradients_and_strides_of_other_kinds(backend, device, param_dtype):
    """16-bit weight and bias (used in float32, as ``weight.float()``), a gradient in another dtype
    than x, and non-contiguous x and gradient: the same results as on their float32 contiguous copies."""
    k = _kernels(backend)
    x, w, b = _inputs(11, 40, torch.bfloat16, device)
    w16, b16 = w.to(param_dtype), b.to(param_dtype)
    grad = torch.randn(11, 40, device=device).to(torch.float16)
    wide_x = torch.stack([x, x], dim=2)[..., 0]  # x's values, every other element of a wider tensor
    wide_g = torch.stack([grad, grad], dim=2)[..., 1]
    assert not wide_x.is_contiguous() and torch.equal(wide_x, x)
    want = k.layer_norm_forward(x, w16.float(), b16.float(), EPS, torch.float32)
    torch.testing.assert_close(k.layer_norm_forward(wide_x, w16, b16, EPS, torch.float32), want, rtol=0, atol=0)
    got = k.layer_norm_backward(wide_x, w16, b16, EPS, wide_g, torch.float32, True, True)
    ref = k.layer_norm_backward(x, w16.float(), b16.float(), EPS, grad.float(), torch.float32, True, True)
    for g, r, name in zip(got, ref, ("grad_x", "xn", "grad_weight", "grad_bias")):
        torch.testing.assert_close(g, r, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def test_triton_refuses_what_its_kernels_do_not_take():
    from pyimputmae.kernels import layer_norm as ln

    w, b = torch.ones(8), torch.zeros(8)
    with pytest.raises(ValueError, match=r"\(M, D\) tensor, got shape \(2, 3, 8\)"):
        ln.layer_norm_forward(torch.zeros(2, 3, 8), w, b, EPS, torch.float32)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32 .* got torch.float64"):
        ln.layer_norm_forward(torch.zeros(2, 8, dtype=torch.float64), w, b, EPS, torch.float32)
    with pytest.raises(ValueError, match=r"bias must be a floating \(8,\) tensor .* got torch.float32 \(7,\)"):
        ln.layer_norm_forward(torch.zeros(2, 8), w, torch.zeros(7), EPS, torch.float32)
    with pytest.raises(ValueError, match=r"grad_out must be a floating \(2, 8\) tensor"):
        ln.layer_norm_backward(torch.zeros(2, 8), w, b, EPS, torch.zeros(2, 7), None, True, False)
    assert not ln.supports(torch.zeros(2, ln.MAX_D + 1)) and ln.supports(torch.zeros(2, ln.MAX_D))
    many_rows = torch.empty(2, ln.INDEX_LIMIT // 2 + 1, 4, device="meta")  # meta: nothing allocated
    assert not ln.supports(many_rows) and not ln.supports(torch.zeros(2, 3, dtype=torch.float64))


# ---- the sublayers -------------------------------------------------------------------------------


def _sublayers(D: int = 48, mlp: int = 96):
    torch.manual_seed(0)
    norm, fc1, fc2 = nn.LayerNorm(D), nn.Linear(D, mlp), nn.Linear(mlp, D)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)
        norm.bias.normal_(0.0, 0.3)
    return norm, fc1, fc2


def _run(x, norm, fc1, fc2):
    """norm_mlp + norm_linear under bf16 autocast on x's device → (output, grads of x and every parameter)."""
    params = [*norm.parameters(), *fc1.parameters(), *fc2.parameters()]
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        out = norm_mlp(x, norm, fc1, fc2).float().square().mean() + norm_linear(x, norm, fc1).float().square().mean()
    return out, torch.autograd.grad(out, [x, *params])


@pytest.mark.parametrize("x_dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")])
@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_sublayers_on_triton_layer_norm_equal_those_on_pytorch(backend, device, monkeypatch, x_dtype):
    """norm_mlp and norm_linear under bf16 autocast with ``layer_norm=triton`` against
    ``layer_norm=reference``: the same loss and gradients (same dtypes) up to bf16 rounding."""
    norm, fc1, fc2 = (m.to(device) for m in _sublayers())
    x = (torch.randn(3, 7, 48, device=device) * 2 + 1).to(x_dtype).requires_grad_()
    results = {}
    for name in ("triton", "reference"):
        monkeypatch.setenv("PYIMPUTMAE_BACKEND", f"layer_norm={name}")
        results[name] = _run(x, norm, fc1, fc2)
    (loss, grads), (loss_ref, grads_ref) = results["triton"], results["reference"]
    torch.testing.assert_close(loss, loss_ref, rtol=1e-2, atol=1e-3)
    names = ["x", "norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    for got, want, name in zip(grads, grads_ref, names):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * float(want.abs().max()),
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


class _Ops(TorchDispatchMode):
    """Records the ATen operations dispatched (name, output shape of the first tensor output)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        first = out[0] if isinstance(out, (tuple, list)) and out else out
        shape = tuple(first.shape) if isinstance(first, torch.Tensor) else None
        self.seen.append((func.overloadpacket.__name__, shape))
        return out


@pytest.mark.parametrize("backend", ["triton"], indirect=True)
def test_triton_sublayers_make_no_float32_copies_of_the_rows(backend, device, monkeypatch):
    """With the Triton LayerNorm a bf16 residual stream is never cast to float32 and back: no
    ``native_layer_norm`` and no dtype cast of an ``(M, D)`` tensor in forward or backward (PyTorch's
    path makes 2 of them in forward and 4 in backward per LayerNorm)."""
    norm, fc1, fc2 = (m.to(device) for m in _sublayers())
    x = torch.randn(21, 48, device=device).to(torch.bfloat16).requires_grad_()
    counts = {}
    for name in ("triton", "reference"):
        monkeypatch.setenv("PYIMPUTMAE_BACKEND", f"layer_norm={name}")
        with _Ops() as ops:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = norm_mlp(x, norm, fc1, fc2)
            out.sum().backward()  # bf16 throughout: no cast of the rows outside the sublayer
        row_casts = [op for op in ops.seen if op == ("_to_copy", (21, 48))]
        layer_norms = [op for op in ops.seen if op[0].startswith("native_layer_norm")]
        counts[name] = (len(row_casts), len(layer_norms))
    assert counts["triton"] == (0, 0), counts
    # what the fused kernels replace: in forward x → fp32, the LayerNorm, its output → bf16; in backward
    # the same three again, the gradient → fp32, the LayerNorm's backward, grad_x → bf16
    assert counts["reference"] == (6, 3), counts


def test_the_sublayers_choose_their_layer_norm(monkeypatch):
    """CPU tensors: PyTorch's LayerNorm (Triton only when asked for by name). CUDA: Triton's once
    validated on a GPU. PYIMPUTMAE_BACKEND=ext (one name for every op) leaves the LayerNorm, which
    ext has no kernels for, to the automatic choice; asking for ext by family is an error."""
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("PYIMPUTMAE_BACKEND", raising=False)
    monkeypatch.delenv("PYIMPUTMAE_GPU_UNVALIDATED", raising=False)
    assert _backends.resolve("layer_norm", cpu) == "reference"
    assert _backends.default_order(cuda, "layer_norm") == ("triton", "reference")
    monkeypatch.setattr(_backends, "availability", lambda name, device: (True, "stub"))
    monkeypatch.setattr(_backends, "GPU_VALIDATED", frozenset({("triton", "masking")}))
    assert _backends.resolve("layer_norm", cuda) == "reference", "not validated on a GPU: PyTorch's"
    monkeypatch.setattr(_backends, "GPU_VALIDATED", frozenset({("triton", "layer_norm")}))
    assert _backends.resolve("layer_norm", cuda) == "triton"
    monkeypatch.setenv("PYIMPUTMAE_BACKEND", "ext")
    assert _backends.resolve("layer_norm", cuda) == "triton" and _backends.resolve("masking", cuda) == "ext"
    monkeypatch.setenv("PYIMPUTMAE_BACKEND", "layer_norm=ext")
    with pytest.raises(_backends.BackendError, match="layer_norm: backend 'ext' .* has no layer_norm kernels"):
        _backends.resolve("layer_norm", cuda)
    explained = _backends.explain(cuda)["layer_norm"]["candidates"]["ext"]
    assert explained == {"ok": False, "why": "has no layer_norm kernels"}

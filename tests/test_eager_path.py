"""The ops' two paths (pyimputmae.ops._common): eager calls reach the backend's kernels without the
custom op's Python layers; torch.compile traces the custom ops; both give the same results."""

from __future__ import annotations

import pytest
import torch
from op_testing import tool_module
from torch.utils._python_dispatch import TorchDispatchMode

from pyimputmae import masked_mse, patch_embed, random_masking, unshuffle_fill

#: the custom ops (what torch.compile sees), as opposed to the kernel-level ops of the extension
CUSTOM_OPS = {"random_keep", "gather_kept", "fill_masked", "masked_token_grad", "masked_mse", "scale_grad",
              "patch_embed", "patch_embed_grad"}


class OpNames(TorchDispatchMode):
    """Records the ``pyimputmae::`` ops that reach the dispatcher."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pyimputmae":
            self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def _forward(backend: str, x: torch.Tensor, w: torch.Tensor, token: torch.Tensor, head: torch.Tensor):
    """Every op's forward on small inputs → (masked-MSE loss, the filled tokens)."""
    tokens = patch_embed(x, w, None, patch=4, backend=backend)  # (2, 4, 6)
    present = torch.tensor([[True, True], [True, False]])
    visible, ids, mask = random_masking(tokens, (2, 2), 0.5, present, torch.tensor([3, 4]), backend=backend)
    full = unshuffle_fill(visible * 2, ids, mask, token, backend=backend)
    return masked_mse(full @ head, x, mask, present[:, 0], patch=4, backend=backend), full


def _step(backend: str, forward=_forward) -> tuple[torch.Tensor, ...]:
    """``forward`` and the backward of its loss → the loss, the filled tokens and the gradients."""
    torch.manual_seed(0)
    x, head = torch.randn(2, 1, 8, 8), torch.randn(6, 16)
    w, token = torch.randn(6, 16, requires_grad=True), torch.randn(6, requires_grad=True)
    loss, full = forward(backend, x, w, token, head)
    return (loss, full, *torch.autograd.grad(loss, (w, token)))


def test_eager_calls_reach_the_kernels_without_the_custom_ops(ext_backend_or_skip):
    with OpNames() as seen:
        _step("ext")
    assert seen.names, "the extension's kernel-level ops should reach the dispatcher"
    assert not seen.names & CUSTOM_OPS, f"eager calls went through the custom ops {seen.names & CUSTOM_OPS}"


def test_compiled_step_traces_the_custom_ops_and_equals_eager():
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(_forward, backend=record, fullgraph=True)
    got, want = _step("reference", compiled), _step("reference")
    targets = {str(node.target) for gm in graphs for node in gm.graph.nodes if node.op == "call_function"}
    assert any("pyimputmae.fill_masked" in t for t in targets), f"no custom op in the traced graph: {targets}"
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", ["reference", "ext"])
def test_eager_backward_refuses_a_second_order_gradient(backend):
    """The backwards are first-order only: a backward asked for a graph (create_graph=True) raises.
    The gradients they return carry no graph, so a second order through them used to lose this op's
    terms silently: masked_mse's gradient 2·w·(pred − target)/(P·Σw) depends on pred, yet a gradient
    penalty on it got nothing back from the op."""
    if backend == "ext":
        from pyimputmae import _backends

        if not _backends.availability("ext", torch.device("cpu"))[0]:
            pytest.skip("the extension is not built")
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 8)
    pred = torch.randn(2, 4, 16, requires_grad=True)
    w = torch.randn(6, 16, requires_grad=True)
    tokens = torch.randn(2, 4, 6, requires_grad=True)
    token = torch.zeros(6, requires_grad=True)
    present, rng = torch.ones(2, 2, dtype=torch.bool), torch.tensor([1, 2])
    losses = {  # the public function (op name): its loss
        "masked_mse": lambda: masked_mse(pred, x, torch.rand(2, 4) > 0.3, patch=4, backend=backend),
        "patch_embed": lambda: patch_embed(x, w, None, patch=4, backend=backend).square().sum(),
        "gather_kept": lambda: random_masking(tokens, [2, 2], 0.5, present, rng, backend=backend)[0].square().sum(),
        "fill_masked": lambda: unshuffle_fill(*random_masking(tokens, [2, 2], 0.5, present, rng, backend=backend),
                                              token, backend=backend).square().sum(),
    }
    for name, loss in losses.items():
        public = {"gather_kept": "random_masking", "fill_masked": "unshuffle_fill"}.get(name, name)
        with pytest.raises(RuntimeError, match=rf"pyimputmae.{public} \(op pyimputmae::{name}\) has no second "
                                               r"derivative: .*create_graph=True.*pyimputmae.reference"):
            torch.autograd.grad(loss(), (pred, w, tokens, token), create_graph=True, allow_unused=True)
        # the usual first-order backward is untouched
        grads = torch.autograd.grad(loss(), (pred, w, tokens, token), allow_unused=True)
        assert any(g is not None for g in grads)


@pytest.fixture
def ext_backend_or_skip():
    from pyimputmae import _backends

    ok, why = _backends.availability("ext", torch.device("cpu"))
    if not ok:
        pytest.skip(f"ext: {why}")


def test_host_overhead_tool_runs():
    """tools/op_overhead.py (run on the GPU machine for ext and Triton) on CPU tensors, one short round."""
    tool = tool_module("op_overhead")
    threads = torch.get_num_threads()
    try:
        assert tool.main(["--backend", "reference", "--rounds", "1", "--calls", "2"]) == 0
    finally:
        torch.set_num_threads(threads)  # the tool pins one thread for steadier timings

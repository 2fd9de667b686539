"""Our CUDA kernels (csrc/cuda/) on machines without a GPU, under the host emulator of tests/cuda_emu/.

Two parts. First the emulator itself: it computes what correct CUDA code computes, and it reports
what hardware would hang on or get wrong (a missing barrier, divergent barriers, warp operations
naming exited lanes, device-side assertions, refused launches). Then the CUDA code paths that the
op suites' small shapes never reach (those suites run every case once more as backend ``cuda_emu``),
the cases of ``tools/cuda_kernel_check.py`` (the same script checks them on a GPU, under
compute-sanitizer): 16-byte moves, segments longer than a block or than the key tile, more segments
than one launch takes, rows of masked MSE longer than what a block holds in registers, misaligned
tensors, each against the reference, bit for bit where the op only moves data or draws the mask.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from op_testing import backend_skip_reason, cuda_emu_build, cuda_emu_ops

from pyimputmae import _backends

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


# ---- the CUDA code paths the op suites do not reach (tools/cuda_kernel_check.py) --------------

def _kernel_check():
    path = Path(__file__).resolve().parents[1] / "tools" / "cuda_kernel_check.py"
    spec = importlib.util.spec_from_file_location("pyimputmae_tools_cuda_kernel_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


KERNEL_CHECK = _kernel_check()


@pytest.mark.parametrize("case", KERNEL_CHECK.CASES, ids=lambda case: case.name)
def test_cuda_code_path_matches_the_reference(emu, case):
    case(emu, torch.device("cpu"))


def test_out_of_range_ids_fail_the_device_assertion(emu):
    tokens = torch.randn(1, 4, 8)
    ids = torch.tensor([[0, 9]])
    mask = torch.tensor([[False, False, True, True]])
    with pytest.raises(RuntimeError, match="device-side assertion"):
        emu.gather_visible(tokens, ids, mask)


# ---- the whole pre-training step through the CUDA kernels ------------------------------------

def test_paper_pretraining_step_through_the_cuda_kernels_matches_the_reference(emu, monkeypatch):
    """ImputeMAE at the authors' configuration (RNA 32 tokens, DNAm 24, WSI 256, MRI 64; width 256),
    three patients with missing modalities: loss, per-modality losses and every parameter's
    gradient with the CUDA kernels equal those with the PyTorch reference, and so does imputation."""
    from pyimputmae.data import Batch
    from pyimputmae.model import ImputeMAE, ModelConfig, new_rng

    torch.manual_seed(0)
    cfg = ModelConfig.named("paper")
    model = ImputeMAE(cfg)
    present = torch.tensor([[True, True, True, True], [True, False, True, False], [False, True, False, False]])
    inputs = {m.name: torch.randn(3, *m.shape) * present[:, i].view(-1, *[1] * len(m.shape))
              for i, m in enumerate(cfg.modalities)}
    zeros = torch.zeros(3)
    batch = Batch(inputs, present, torch.zeros(3, 0), zeros, zeros, cfg.names)

    def step(backend: str):
        monkeypatch.setenv("PYIMPUTMAE_BACKEND", backend)
        model.zero_grad(set_to_none=True)
        loss, per = model.forward_pretrain(batch, new_rng(7))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
        model.eval()
        with torch.no_grad():
            imputed = model.impute(batch)
        model.train()
        return loss.detach(), {k: v.detach() for k, v in per.items()}, grads, imputed

    loss_ref, per_ref, grads_ref, imputed_ref = step("reference")
    monkeypatch.setattr(_backends.module("ext"), "_ops", emu)
    loss, per, grads, imputed = step("ext")
    def close(actual, expected, what, rtol=1e-4, atol=1e-5):
        scale = max(1.0, expected.abs().max().item())
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * scale, msg=lambda m: f"{what}: {m}")

    close(loss, loss_ref, "loss", rtol=1e-5, atol=1e-6)
    for name in per_ref:
        close(per[name], per_ref[name], f"loss of {name}", rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name, g_ref in grads_ref.items():
        close(grads[name], g_ref, f"gradient of {name}")
    for name, x_ref in imputed_ref.items():
        close(imputed[name], x_ref, f"imputed {name}")

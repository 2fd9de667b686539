"""The Triton kernels given an index outside its range on a GPU tensor, where the launchers do not
check it (reading it would synchronise the host): an out-of-range ``keep`` (patch embedding) or
``ids_keep`` (masking gather / unshuffle) never touches memory outside the tensors, and
``TRITON_DEBUG=1`` reports it as the CUDA kernels' ``CUDA_KERNEL_ASSERT`` does.

The kernel-level functions are called directly (the public ops refuse such an index on CPU before
any kernel runs), under the interpreter, in a process of their own: an unmasked access at an index
of 2^40 was a segmentation fault there. The interpreter never compiles device asserts in (its
options have ``debug=False`` whatever ``TRITON_DEBUG`` says), so the debug run switches them on in
the interpreter's options, as ``TRITON_DEBUG=1`` does for a compiled kernel.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from op_testing import backend_skip_reason

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r'''
import dataclasses
import sys

import torch

debug = sys.argv[1] == "debug"
if debug:  # what TRITON_DEBUG=1 does for a compiled kernel: device asserts compiled in
    from triton.runtime import interpreter
    builder = interpreter.interpreter_builder
    builder.options = dataclasses.replace(builder.options, debug=True)

from pyimputmae import _backends
from pyimputmae.reference import backend as ref

# the kernels/ beside the package under test (an editable install of another checkout maps
# pyimputmae.kernels to its own); an installed package has none there and imports its own
kernels = _backends._kernels_from_checkout()[0] or _backends.module("triton")
BIG = 2**40  # far outside any allocation: an unmasked access faults
torch.manual_seed(0)


def report(what, run):
    """Debug mode: the call must fail with the kernel's assert message."""
    try:
        run()
    except BaseException as err:  # the interpreter re-raises the kernel's AssertionError
        print(f"{what}: {type(err).__name__}: {err}")
        return
    print(f"{what}: no error")


# patch embedding: x (3, 2, 4, 4), patch 2: L = 4 patches of F = 8 features, E = 5
keep = torch.tensor([[0, -1, 3], [BIG, 2, 4], [1, -BIG, 2]])
bad = (keep < 0) | (keep >= 4)
# each bad entry replaced by a patch its row does not keep, its rows of grad_out zeroed: the spec's
# result for rows that read and write nothing
fixed = torch.tensor([[0, 1, 3], [0, 2, 1], [1, 0, 2]])
if debug:
    x, w = torch.randn(3, 2, 4, 4), torch.randn(5, 8)
    report("patch_embed_forward", lambda: kernels.patch_embed_forward(x, w, None, None, keep, 2))
    report("patch_embed_backward grad_x",
           lambda: kernels.patch_embed_backward(torch.randn(3, 3, 5), x, w, keep, 2, True, False))
    report("patch_embed_backward grad_weight",
           lambda: kernels.patch_embed_backward(torch.randn(3, 3, 5), x, w, keep, 2, False, True))
else:
    for dtype in (torch.float32, torch.float64):  # the tensor-core path and the fp64 outer products
        x, w = torch.randn(3, 2, 4, 4, dtype=dtype), torch.randn(5, 8, dtype=dtype)
        bias, pos = torch.randn(5, dtype=dtype), torch.randn(4, 5, dtype=dtype)
        out = kernels.patch_embed_forward(x, w, bias, pos, keep, 2)
        expected = ref.patch_embed_forward(x, w, bias, pos, fixed, 2)
        expected[bad] = bias  # no patch read, no position added
        torch.testing.assert_close(out, expected)
        grad_out = torch.randn(3, 3, 5, dtype=dtype)
        grad_out[bad] = 0
        gx, gw = kernels.patch_embed_backward(grad_out, x, w, keep, 2, True, True)
        ex, ew = ref.patch_embed_backward(grad_out, x, w, fixed, 2, True, True)
        torch.testing.assert_close(gx, ex)
        torch.testing.assert_close(gw, ew)
    print("patch_embed: ok")

# masking: tokens (2, 5, 3); the bad ids give a zero row (gather) and are ignored (unshuffle)
ids = torch.tensor([[0, BIG, 3], [-BIG, 4, -1]])
mask = torch.tensor([[False, True, True, False, True], [True, True, True, True, False]])
tokens, token = torch.randn(2, 5, 3), torch.randn(3)
x = torch.randn(2, 3, 3)
if debug:
    report("gather_visible", lambda: kernels.gather_visible(tokens, ids, mask))
    report("unshuffle_fill", lambda: kernels.unshuffle_fill(x, ids, mask, token))
else:
    gathered = kernels.gather_visible(tokens, ids, mask)
    torch.testing.assert_close(gathered[0], torch.stack([tokens[0, 0], torch.zeros(3), tokens[0, 3]]))
    torch.testing.assert_close(gathered[1], torch.stack([torch.zeros(3), tokens[1, 4], torch.zeros(3)]))
    filled = kernels.unshuffle_fill(x, ids, mask, token)
    expected = token.expand(2, 5, 3).clone()
    expected[0, 0], expected[0, 3], expected[1, 4] = x[0, 0], x[0, 2], x[1, 1]
    torch.testing.assert_close(filled, expected)
    print("masking: ok")
'''


def run_script(mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    env.pop("TRITON_DEBUG", None)
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


@pytest.fixture(scope="module", autouse=True)
def _triton():
    reason = backend_skip_reason("triton", torch.device("cpu"), ("patch_embed", "masking"))
    if reason:
        pytest.skip(reason)


def test_an_index_out_of_range_never_reaches_memory_outside_the_tensors():
    """Its row reads nothing (a forward row of bias alone, no gradient from it) and writes nothing
    outside the output; every other row is the spec's."""
    run = run_script("plain")
    assert run.returncode == 0, f"exit status {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    assert run.stdout.split() == ["patch_embed:", "ok", "masking:", "ok"]


def test_an_index_out_of_range_is_reported_by_the_device_assert_in_debug_mode():
    run = run_script("debug")
    assert run.returncode == 0, f"exit status {run.returncode}\n{run.stdout}\n{run.stderr[-3000:]}"
    lines = run.stdout.splitlines()
    assert len(lines) == 5, run.stdout
    for line, op in zip(lines, ["patch_embed_forward", "patch_embed_backward grad_x",
                                "patch_embed_backward grad_weight", "gather_visible", "unshuffle_fill"]):
        assert line.startswith(f"{op}: "), line
        assert "AssertionError" in line and "out of [0, L)" in line, line
    assert "patch_embed: keep index out of [0, L)" in lines[0]
    assert "gather_visible: ids_keep out of [0, L)" in lines[3]
    assert "unshuffle_fill: ids_keep out of [0, L)" in lines[4]

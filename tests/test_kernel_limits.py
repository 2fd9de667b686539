"""Sizes the GPU kernels cannot index: a clear ValueError before anything is allocated or launched.

The Triton and CUDA kernels take lengths, counts and loop bounds as 32-bit numbers (tensor offsets
are 64-bit), so each must stay below ``2^31 - 2^16``; a Triton launch grid's second axis takes at
most 65,535 tiles, a CUDA grid's first at most 2^31 - 1 blocks. The Triton inputs here are ``meta``
tensors: the shapes are real, nothing is allocated, and a launcher that forgot its check would fail
on the meta tensors with a different error than the one asserted. The CUDA launchers run under the
host emulator (``tests/cuda_emu``) on CPU tensors expanded from one element: the shapes are real and
a few bytes are allocated, so each check must come before the launcher's own allocations.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from op_testing import backend_skip_reason, cuda_emu_ops, tool_module

BIG = 2**31 - 2**16  # the first size refused


def _skip_unless(backend: str) -> None:
    reason = backend_skip_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def kernels():
    _skip_unless("triton")
    from pyimputmae import _backends

    return _backends.module("triton")


@pytest.fixture(scope="module")
def emu():
    """Our CUDA launchers and kernels (``csrc/cuda``) under the host emulator."""
    _skip_unless("cuda_emu")
    return cuda_emu_ops()


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


def test_launch_grids_of_inputs_past_2_to_the_31_elements_fit_cuda(kernels):
    """The launchers at their GPU tile sizes on meta inputs of 2^31 to 2^33 elements (row counts,
    per-sample strides and element counts past 32 bits): every grid they would launch has at most
    2^31 - 1 programs along its first axis and 65,535 along the others. Checked by
    ``tools/triton_compile_check.py --size huge --grids-only`` in a process of its own, since the
    kernels of this one are built for the interpreter and pick its tiles."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "triton_compile_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(tool), "--size", "huge", "--grids-only", "--dtypes", "bf16,fp64"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert run.stdout.rstrip().endswith("all ok")
    launched = {line.split(": ")[-2] for line in run.stdout.splitlines() if line.endswith(" ok") and "grid (" in line}
    sources = (Path(__file__).resolve().parents[1] / "kernels").glob("*.py")
    every = set(re.findall(r"@triton\.jit\ndef (_\w+_kernel)\(", "".join(f.read_text() for f in sources)))
    assert len(every) >= 16 and launched == every, sorted(every ^ launched)  # every kernel of pyimputmae.kernels


def test_compile_check_takes_the_benchmark_sizes_together(kernels):
    """``--size large,paper`` records the launchers at both of bench's sizes (what the Triton cache
    carried to a GPU run holds), each case named with its size; the paper size's unequal masking
    segments included. An unknown size is refused by name."""
    tool = Path(__file__).resolve().parents[1] / "tools" / "triton_compile_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(tool), "--size", "large,paper", "--grids-only", "--dtypes", "bf16",
                          "-k", "select_keep"], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if "_select_keep_kernel" in line]
    # one program per (row, segment) of at most four segments: B = 64 rows at large, 96 at paper
    assert any("(large)" in line and "grid (64, 4)" in line for line in lines), run.stdout
    assert any("(paper)" in line and "grid (96, 4)" in line for line in lines), run.stdout
    refused = subprocess.run([sys.executable, str(tool), "--size", "large,medium", "--grids-only"],
                             capture_output=True, text=True, env=env, timeout=600)
    assert refused.returncode == 2 and "--size takes large, paper, small, huge" in refused.stderr, refused.stderr


def test_a_grid_past_cuda_limits_is_reported(kernels):
    tool = tool_module("triton_compile_check")  # (it drops TRITON_INTERPRET; tool_module puts it back)
    assert tool.grid_error((2**31 - 1, 65535, 65535)) is None
    assert tool.grid_error((4, 65536)) == "grid (4, 65536): 65,536 programs along axis 1, CUDA takes at most 65,535"
    assert "2,147,483,648 programs along axis 0" in tool.grid_error((2**31,))


# ---- the CUDA launchers (csrc/cuda), under the host emulator ---------------------------------

def huge(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A CPU tensor of ``shape`` holding one element (every stride 0)."""
    return torch.zeros((1,) * len(shape), dtype=dtype).expand(*shape)


def cuda_message(op: str, what: str, n: int) -> str:
    return (rf"{op}: {what} = {n:,} is too large for the CUDA kernels \(they take sizes below 2\^31 - 2\^16 = "
            rf"2,147,418,112\); split the input or use backend='reference'")


def test_cuda_patch_grid_of_2_to_the_32_patches_is_refused(emu):
    x = huge(1, 1, 65536, 65536)
    where = r"input \[1, 1, 65536, 65536\], patch 1"
    with pytest.raises(ValueError, match=cuda_message(f"patch_embed_forward: {where}", "patches", 2**32)):
        emu.patch_embed_forward(x, torch.zeros(8, 1), None, None, None, 1)
    with pytest.raises(ValueError, match=cuda_message(f"masked_mse: {where}", "patches", 2**32)):
        emu.masked_mse_forward(huge(1, 2**32, 1), x, huge(1, 2**32), 1, False)


def test_cuda_patch_features_beyond_the_limit_are_refused(emu):
    x = huge(1, 2**17, 128, 128)  # C·p² = 2^31 features in one patch of 128 × 128
    with pytest.raises(ValueError, match=r"patch_embed_backward: input \[1, 131072, 128, 128\], patch 128: "
                                         r"features C\*p\^k = 2,147,483,648 is too large for the CUDA kernels"):
        emu.patch_embed_backward(huge(1, 1, 1), x, huge(1, 2**31), None, 128, True, True)


def test_cuda_keep_width_and_keep_rows_beyond_the_limits_are_refused(emu):
    x, weight = torch.zeros(1, 1, 8, 8), torch.zeros(8, 16)
    with pytest.raises(ValueError, match=cuda_message("patch_embed_forward", r"K \(columns of keep\)", BIG)):
        emu.patch_embed_forward(x, weight, None, None, huge(1, BIG, dtype=torch.int64), 4)
    # grad_x with keep inverts keep with one CUDA block per batch item (with K = 0 kept patches too)
    B = 2**31
    with pytest.raises(ValueError, match=r"patch_embed_backward: B \(rows of keep\) = 2,147,483,648 is too large "
                                         r"for one CUDA launch \(at most 2,147,483,647\)"):
        emu.patch_embed_backward(huge(B, 0, 8), huge(B, 1, 4), torch.zeros(8, 4), huge(B, 0, dtype=torch.int64), 4,
                                 True, False)


def test_cuda_gemm_sizes_beyond_cublas_int32_are_refused(emu):
    """cuBLAS takes a GEMM's sizes and leading dimensions as 32-bit ints: B·K (or B·L) patch rows
    and the embedding width E are refused, naming them, before the (B·K, F) patches are allocated
    (the inputs here are one element expanded: an allocation of that size would fail differently)."""
    B, K = 2**15 - 1, 2**16  # B·K = 2^31 - 2^16, the first size refused, each factor far below it
    x, weight = huge(B, 1, 8), torch.zeros(8, 4)
    rows = cuda_message("patch_embed_forward", r"B\*K \(patch rows of the GEMM: rows of keep times its columns\)",
                        BIG)
    with pytest.raises(ValueError, match=rows):
        emu.patch_embed_forward(x, weight, None, None, huge(B, K, dtype=torch.int64), 4)
    with pytest.raises(ValueError, match=rows.replace("forward", "backward")):
        emu.patch_embed_backward(huge(B, K, 8), x, weight, huge(B, K, dtype=torch.int64), 4, True, True)
    # without keep every patch is a row: B·L, here 2^30 items of L = 2 patches
    with pytest.raises(ValueError, match=cuda_message(
            "patch_embed_forward", r"B\*L \(patch rows of the GEMM: batch size times patches per item\)", 2**31)):
        emu.patch_embed_forward(huge(2**30, 1, 8), weight, None, None, None, 4)
    with pytest.raises(ValueError, match=cuda_message(
            "patch_embed_backward", r"B\*L \(patch rows of the GEMM: batch size times patches per item\)", 2**31)):
        emu.patch_embed_backward(huge(2**30, 2, 8), huge(2**30, 1, 8), weight, None, 4, False, True)
    width = cuda_message("patch_embed_forward", r"E \(rows of weight, the embedding width\)", BIG)
    with pytest.raises(ValueError, match=width):
        emu.patch_embed_forward(torch.zeros(1, 1, 8), huge(BIG, 4), None, None, None, 4)
    with pytest.raises(ValueError, match=width.replace("forward", "backward")):
        emu.patch_embed_backward(huge(1, 2, BIG), torch.zeros(1, 1, 8), huge(BIG, 4), None, 4, True, False)
    # one row fewer, one width less: past these checks to the next one (a bias of the wrong shape)
    with pytest.raises(RuntimeError, match=r"patch_embed_forward: bias must be \(E,\) = \(8,\)"):
        emu.patch_embed_forward(x, weight, torch.zeros(3), None, huge(B, K - 1, dtype=torch.int64), 4)
    with pytest.raises(RuntimeError, match=rf"patch_embed_forward: bias must be \(E,\) = \({BIG - 1},\)"):
        emu.patch_embed_forward(torch.zeros(1, 1, 8), huge(BIG - 1, 4), torch.zeros(3), None, None, 4)


def test_cuda_masking_sizes_beyond_the_limits_are_refused(emu):
    rng = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(ValueError, match=cuda_message("select_keep", r"L \(sum of the segment lengths\)", 2**31)):
        emu.select_keep(torch.ones(1, 2, dtype=torch.bool), [2**30, 2**30], [1, 1], rng)
    # one block per patient: refused before the (B, K) ids and the (B, L) mask are allocated
    with pytest.raises(ValueError, match=r"select_keep: B \(rows of present\) = 2,147,483,648 is too large for one "
                                         r"CUDA launch"):
        emu.select_keep(huge(2**31, 1, dtype=torch.bool), [4], [2], rng)
    ids, token = torch.zeros(1, 2, dtype=torch.int64), torch.zeros(8)
    with pytest.raises(ValueError, match=cuda_message("gather_visible", r"E \(token width\)", BIG)):
        emu.gather_visible(huge(1, 4, BIG), ids, torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match=cuda_message("unshuffle_fill", r"L \(columns of mask\)", BIG)):
        emu.unshuffle_fill(torch.zeros(1, 2, 8), ids, huge(1, BIG, dtype=torch.bool), token)
    with pytest.raises(ValueError, match=cuda_message("unshuffle_fill", r"K \(columns of x\)", BIG)):
        emu.unshuffle_fill(huge(1, BIG, 8), huge(1, BIG, dtype=torch.int64), torch.zeros(1, 16, dtype=torch.bool),
                           token)
    with pytest.raises(ValueError, match=cuda_message("unshuffle_fill", r"E \(token width\)", BIG)):
        emu.unshuffle_fill(huge(1, 2, BIG), ids, torch.zeros(1, 4, dtype=torch.bool), huge(BIG))
    B = 2**31
    with pytest.raises(ValueError, match=r"unshuffle_fill: B \(rows of x\) = 2,147,483,648 is too large for one "
                                         r"CUDA launch"):
        emu.unshuffle_fill(huge(B, 2, 8), huge(B, 2, dtype=torch.int64), huge(B, 4, dtype=torch.bool), token)


def test_cuda_sizes_just_below_the_limits_pass_the_checks(emu):
    """The last accepted size gets past the size checks to the next one (nothing that size is run)."""
    with pytest.raises(ValueError, match=r"select_keep: B \(rows of present\)"):  # L = BIG - 1 accepted
        emu.select_keep(huge(2**31, 1, dtype=torch.bool), [BIG - 1], [0], torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"unshuffle_fill: E \(token width\)"):  # L, K = BIG - 1 accepted
        emu.unshuffle_fill(huge(1, BIG - 1, BIG), huge(1, BIG - 1, dtype=torch.int64),
                           huge(1, BIG - 1, dtype=torch.bool), huge(BIG))

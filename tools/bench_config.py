"""What a run of ``tools/bench.py`` chooses from: our backends, the baselines, the passes, the dtypes
and the sizes of DESIGN.md section 5, and the correctness guard's tolerance."""

from __future__ import annotations

import torch

OUR_BACKENDS = ("ext", "triton", "reference")
BASELINES = ("eager", "compile", "conv")
PASSES = ("fwd", "fwd+bwd")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# max|ours − eager| / max|eager| allowed by the correctness guard: loose on purpose (TF32 GEMMs,
# other summation orders); it catches wrong results, not rounding
CHECK_TOL = {"fp32": 5e-3, "bf16": 5e-2, "fp16": 1e-2}

# DESIGN.md section 5. tiny: smoke tests and tests/bench only, not a reported size.
SIZES: dict[str, dict[str, dict]] = {
    "paper": {
        "mse": {"B": 96, "C": 1, "S": 64, "p": 16},  # MRI: L = 64, P = 4096
        "masking": {"B": 96, "lengths": (32, 24, 256, 64), "E": 256},
        "patch": {"B": 96, "C": 1, "S": 64, "p": 16, "E": 256},
    },
    "large": {
        "mse": {"B": 32, "C": 4, "S": 64, "p": 8},  # L = 512, P = 2048
        "masking": {"B": 64, "lengths": (256, 256, 256, 256), "E": 384},
        "patch": {"B": 32, "C": 4, "S": 64, "p": 8, "E": 384},
    },
    "tiny": {
        "mse": {"B": 4, "C": 1, "S": 16, "p": 4},
        "masking": {"B": 4, "lengths": (8, 6, 16, 8), "E": 32},
        "patch": {"B": 4, "C": 1, "S": 16, "p": 4, "E": 32},
    },
}

"""pyimputmae: impuTMAE multimodal masked pre-training and survival prediction for oncology.

Importing needs only torch and numpy; the compiled kernels load lazily on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from . import ops, reference
from .ops import masked_mse, patch_embed, random_keep, random_masking, unshuffle_fill


def __getattr__(name: str):
    # the training entry points import the model, lazily: `import pyimputmae` stays light
    if name in ("train", "TrainConfig"):
        from . import training

        return getattr(training, name)
    if name == "load":
        from .inference import load

        return load
    raise AttributeError(f"module 'pyimputmae' has no attribute {name!r}")


__all__ = [
    "TrainConfig",
    "__version__",
    "load",
    "masked_mse",
    "ops",
    "patch_embed",
    "random_keep",
    "random_masking",
    "reference",
    "train",
    "unshuffle_fill",
]

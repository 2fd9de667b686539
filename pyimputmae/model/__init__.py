"""The impuTMAE model: configuration, per-modality encoders, the masked autoencoder, the survival model.

``ImputeMAE(config)`` pre-trains (``forward_pretrain(batch, rng)``) and imputes (``impute(batch)``);
``SurvivalModel(mae, config)`` fine-tunes it for discrete-time survival (``model(batch)`` → hazard
logits, ``predict_survival(batch)``). Save with ``state_dict()`` + ``config.to_dict()``.
"""

from .config import FREEZE_POLICIES, ModalityConfig, ModelConfig, resolve_config
from .encoders import ClinicalEncoder, PatchEncoder, count_parameters
from .mae import ImputeMAE, advance_rng_, eval_mode, new_rng, normalized_inputs
from .survival import SurvivalModel, apply_freeze

__all__ = [
    "FREEZE_POLICIES",
    "ClinicalEncoder",
    "ImputeMAE",
    "ModalityConfig",
    "ModelConfig",
    "PatchEncoder",
    "SurvivalModel",
    "advance_rng_",
    "apply_freeze",
    "count_parameters",
    "eval_mode",
    "new_rng",
    "normalized_inputs",
    "resolve_config",
]

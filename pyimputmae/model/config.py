"""Model configuration: one :class:`ModalityConfig` per modality, one :class:`ModelConfig` for the rest.

Everything here is plain data (``to_dict`` / ``from_dict`` give JSON/YAML-able dicts) and is
checked on construction, so a bad size fails here, with the modality and axis named, rather
than deep inside a kernel. ``ModelConfig.paper()`` is the authors' configuration (DESIGN.md §1)
and ``ModelConfig.small()`` a CPU-sized one for the demo and the tests; ``ModelConfig.named``
resolves ``"paper"`` / ``"small"``.

Token layout (DESIGN.md §2): modalities keep the configured order; modality ``m`` owns tokens
``[o_m, o_m + L_m)`` of the joint sequence, ``L_m = Π S_i / p_m``, and ``K_m = floor(L_m·(1 − r_m))``
of them are visible during pre-training.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .._fields import check_fields, reject_unknown
from ..reference.masking import keep_counts

#: Fine-tuning freezing policies: modality → number of its last encoder blocks left trainable
#: (``-1``: the whole encoder, patch embedding included). A modality a policy does not name is
#: treated like the omics (last block trainable).
FREEZE_POLICIES: dict[str, dict[str, int]] = {
    # the paper's text: MRI and WSI encoders frozen, RNA/DNAm with all but the last block frozen
    "paper": {"rna": 1, "dnam": 1, "wsi": 0, "mri": 0},
    # the authors' public code: as above, but the last WSI block is trainable too
    "authors_code": {"rna": 1, "dnam": 1, "wsi": 1, "mri": 0},
    # everything trainable (fine-tuning from scratch, or an ablation)
    "none": {},
}
FREEZE_DEFAULT_BLOCKS = 1

MISSING_MODES = ("mask", "impute")
CLINICAL_MODES = ("tokens", "concat")
POS_EMBEDS = ("sincos", "learned")


def _choice(what: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclass(frozen=True)
class ModalityConfig:
    """One modality: input ``(C, *spatial)`` per patient, cut into ``patch^k`` patches.

    name: identifier (``"rna"``); channels: ``C``; spatial: ``(S_1, .., S_k)`` with ``k`` in 1..3,
    every ``S_i`` divisible by ``patch``; depth: encoder transformer blocks.
    """

    name: str
    channels: int
    spatial: tuple[int, ...]
    patch: int
    depth: int

    def __post_init__(self) -> None:
        check_fields(self, "ModalityConfig.")
        if not self.name.isidentifier():
            raise ValueError(f"modality name {self.name!r} must be a Python identifier (it names a submodule)")
        where = f"modality {self.name!r}"
        if not 1 <= len(self.spatial) <= 3:
            raise ValueError(f"{where}: spatial must have 1 to 3 axes, got {self.spatial}")
        if self.channels < 1:
            raise ValueError(f"{where}: channels must be ≥ 1, got {self.channels}")
        if self.patch < 1:
            raise ValueError(f"{where}: patch must be ≥ 1, got {self.patch}")
        if self.depth < 1:
            raise ValueError(f"{where}: depth must be ≥ 1, got {self.depth}")
        for axis, size in enumerate(self.spatial):
            if size < 1 or size % self.patch:
                raise ValueError(f"{where}: spatial size {size} on axis {axis} of {self.spatial} is not a positive "
                                 f"multiple of its patch size {self.patch}")

    @property
    def grid(self) -> tuple[int, ...]:
        """The patch grid ``S_i / p``."""
        return tuple(s // self.patch for s in self.spatial)

    @property
    def n_tokens(self) -> int:
        """``L_m``: patches (tokens) per patient."""
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        """``P_m = C·p^k``: values per patch (the reconstruction head's width)."""
        return self.channels * self.patch ** len(self.spatial)

    @property
    def shape(self) -> tuple[int, ...]:
        """``(C, *spatial)``: one patient's input."""
        return (self.channels, *self.spatial)


@dataclass(frozen=True)
class ModelConfig:
    """The whole model: encoders, decoder, masking, clinical tokens, fusion and survival head.

    Pre-training: modalities (ordered: the token layout), dim/heads/mlp/dropout of every encoder,
    ``pos_embed`` ("sincos": fixed sin-cos positions over each modality's patch grid, as MAE;
    "learned": zero-initialised learnable), the shared decoder (``decoder_*``), ``mask_ratio`` (one
    for all or a ``{modality: ratio}`` dict, default 0.5 for modalities it omits) and ``norm_pix``.
    Fine-tuning: ``clinical_features`` (column names, in the cohort's order; empty = none),
    ``clinical_tokens`` / ``clinical_hidden`` (its small MLP), ``clinical_mode`` ("tokens": clinical
    tokens take part in fusion; "concat": the authors' way, processed clinical values concatenated
    before the head), ``n_bins`` discrete-time intervals, ``fusion_heads`` / ``fusion_dropout``,
    ``freeze`` (a name in :data:`FREEZE_POLICIES` or ``{modality: trainable last blocks}``), and
    ``missing`` ("mask": a missing modality is excluded by attention masking; "impute": the
    decoder reconstructs it and its encoder encodes the reconstruction; not with ``norm_pix``, whose
    reconstructions are per-patch normalised rather than raw inputs).
    """

    modalities: tuple[ModalityConfig, ...]
    dim: int = 256
    heads: int = 4
    mlp: int = 1024
    dropout: float = 0.0
    pos_embed: str = "sincos"
    decoder_depth: int = 3
    decoder_dim: int = 256
    decoder_heads: int = 4
    decoder_mlp: int = 512
    mask_ratio: float | Mapping[str, float] = 0.5
    norm_pix: bool = False
    clinical_features: tuple[str, ...] = ()
    clinical_tokens: int = 2
    clinical_hidden: int = 64
    clinical_mode: str = "tokens"
    n_bins: int = 20
    fusion_heads: int = 4
    fusion_dropout: float = 0.3
    freeze: str | Mapping[str, int] = "paper"
    missing: str = "mask"

    def __post_init__(self) -> None:
        # types first (tuples, dicts and numbers converted; modalities given as dicts are checked
        # dicts here), so that the checks below compare numbers with numbers
        check_fields(self, "ModelConfig.")
        mods = tuple(m if isinstance(m, ModalityConfig) else ModalityConfig(**m) for m in self.modalities)
        object.__setattr__(self, "modalities", mods)
        self._validate()

    # ------------------------------------------------------------------ checks
    def _validate(self) -> None:
        if not self.modalities:
            raise ValueError("ModelConfig needs at least one modality")
        names = self.names
        if len(set(names)) != len(names):
            raise ValueError(f"modality names must be unique, got {list(names)}")
        for what, width, heads in (("dim", self.dim, self.heads), ("decoder_dim", self.decoder_dim, self.decoder_heads),
                                   ("dim (fusion)", self.dim, self.fusion_heads)):
            if width < 1 or heads < 1 or width % heads:
                raise ValueError(f"{what} = {width} must be a positive multiple of its head count {heads}")
        for what, n in (("mlp", self.mlp), ("decoder_mlp", self.decoder_mlp), ("n_bins", self.n_bins),
                        ("clinical_hidden", self.clinical_hidden)):
            if n < 1:
                raise ValueError(f"{what} must be ≥ 1, got {n}")
        if self.decoder_depth < 0 or self.clinical_tokens < 0:
            raise ValueError("decoder_depth and clinical_tokens must be ≥ 0")
        for what, p in (("dropout", self.dropout), ("fusion_dropout", self.fusion_dropout)):
            if not 0.0 <= p < 1.0:
                raise ValueError(f"{what} must lie in [0, 1), got {p}")
        _choice("pos_embed", self.pos_embed, POS_EMBEDS)
        _choice("clinical_mode", self.clinical_mode, CLINICAL_MODES)
        _choice("missing", self.missing, MISSING_MODES)
        if self.missing == "impute" and self.norm_pix:
            raise ValueError("missing='impute' cannot be combined with norm_pix=True: with norm_pix the decoder "
                             "reconstructs each patch normalised to mean 0 and variance 1, not the raw input the "
                             "encoders read, and a missing modality's own patch means and variances are unknown; "
                             "set norm_pix=False to fine-tune on imputed modalities, or missing='mask'")
        if self.clinical_mode == "tokens" and self.clinical_features and self.clinical_tokens < 1:
            raise ValueError("clinical_mode='tokens' with clinical features needs clinical_tokens ≥ 1")
        if isinstance(self.mask_ratio, dict):
            self._check_names("mask_ratio", self.mask_ratio)
        for m, r in zip(self.modalities, self.ratios):
            if not 0.0 <= r < 1.0:
                raise ValueError(f"modality {m.name!r}: mask ratio must lie in [0, 1), got {r}")
        for m, r, k in zip(self.modalities, self.ratios, self.keeps):
            if k < 1:
                raise ValueError(f"modality {m.name!r}: mask ratio {r} leaves no visible token of its "
                                 f"{m.n_tokens} (floor(L·(1 − r)) must be ≥ 1)")
        if isinstance(self.freeze, str):
            _choice("freeze", self.freeze, tuple(FREEZE_POLICIES))
        else:
            self._check_names("freeze", self.freeze)
            for name, n in self.freeze.items():
                if n < -1:
                    raise ValueError(f"freeze[{name!r}] must be -1 (all trainable) or ≥ 0 trainable blocks, got {n}")

    def _check_names(self, what: str, mapping: Mapping[str, Any]) -> None:
        unknown = [k for k in mapping if k not in self.names]
        if unknown:
            raise ValueError(f"{what} names unknown modality {unknown[0]!r}; configured: {', '.join(self.names)}")

    # ------------------------------------------------------------ derived sizes
    @property
    def names(self) -> tuple[str, ...]:
        """Modality names in token-layout order."""
        return tuple(m.name for m in self.modalities)

    def modality(self, name: str) -> ModalityConfig:
        """The :class:`ModalityConfig` called ``name`` (ValueError naming the configured ones otherwise)."""
        for m in self.modalities:
            if m.name == name:
                return m
        raise ValueError(f"unknown modality {name!r}; configured: {', '.join(self.names)}")

    @property
    def lengths(self) -> tuple[int, ...]:
        """``L_m`` per modality."""
        return tuple(m.n_tokens for m in self.modalities)

    @property
    def ratios(self) -> tuple[float, ...]:
        """Pre-training mask ratio ``r_m`` per modality."""
        if isinstance(self.mask_ratio, dict):
            return tuple(float(self.mask_ratio.get(n, 0.5)) for n in self.names)
        return (float(self.mask_ratio),) * len(self.modalities)

    @property
    def keeps(self) -> tuple[int, ...]:
        """``K_m = floor(L_m·(1 − r_m))`` visible tokens per modality during pre-training."""
        return tuple(keep_counts(self.lengths, self.ratios))

    def trainable_blocks(self) -> dict[str, int]:
        """The freezing policy resolved per modality: last blocks left trainable (-1 = all)."""
        if isinstance(self.freeze, str):
            policy = FREEZE_POLICIES[self.freeze]
            if not policy:
                return {n: -1 for n in self.names}
            return {n: policy.get(n, FREEZE_DEFAULT_BLOCKS) for n in self.names}
        return {n: self.freeze.get(n, FREEZE_DEFAULT_BLOCKS) for n in self.names}

    # ---------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON/YAML-able dict (lists for tuples) that :meth:`from_dict` turns back into this config."""
        out = dataclasses.asdict(self)
        out["modalities"] = [{**m, "spatial": list(m["spatial"])} for m in out["modalities"]]
        out["clinical_features"] = list(self.clinical_features)
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error (naming them)."""
        reject_unknown(cls, d, "ModelConfig keys")
        if "modalities" not in d:
            raise ValueError(f"a model configuration given as a dict needs 'modalities' (it is a whole configuration, "
                             f"got only {sorted(d)}); to change a few settings of a named one, give the name and "
                             f"the changes (in train(): model='small', model_overrides={dict(d)!r})")
        return cls(**dict(d))

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with ``changes`` applied (and validated; unknown keys are an error naming them)."""
        reject_unknown(type(self), changes, "ModelConfig keys")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ named configs
    @classmethod
    def paper(cls, mri_channels: int = 1, **changes: Any) -> ModelConfig:
        """The authors' configuration (DESIGN.md §1): width 256, 4 heads, MLP 1024; RNA 1×16384 p512
        depth 6 (32 tokens), DNAm 1×24576 p1024 depth 6 (24), WSI 3×256×256 p16 depth 4 (256), MRI
        C×64³ p16 depth 4 (64); decoder 3×256, MLP 512; mask 0.5; clinical radiation, chemo, age
        concatenated before a Linear(256 → 20) head; fusion 4 heads, dropout 0.3; paper's freezing."""
        base = cls(
            modalities=(
                ModalityConfig("rna", 1, (16384,), 512, 6),
                ModalityConfig("dnam", 1, (24576,), 1024, 6),
                ModalityConfig("wsi", 3, (256, 256), 16, 4),
                ModalityConfig("mri", mri_channels, (64, 64, 64), 16, 4),
            ),
            clinical_features=("radiation", "chemo", "age"),
            clinical_mode="concat",
        )
        return base.replace(**changes) if changes else base

    @classmethod
    def small(cls, **changes: Any) -> ModelConfig:
        """A CPU-sized configuration for the demo and tests: width 64, 4 heads, MLP 128; RNA 1×1024
        p64 (16 tokens), DNAm 1×1536 p128 (12), WSI 3×64×64 p16 (16), MRI 1×32³ p8 (64); depth 2,
        decoder 2×64 (MLP 128); clinical radiation, chemo, age as 2 fusion tokens."""
        base = cls(
            modalities=(
                ModalityConfig("rna", 1, (1024,), 64, 2),
                ModalityConfig("dnam", 1, (1536,), 128, 2),
                ModalityConfig("wsi", 3, (64, 64), 16, 2),
                ModalityConfig("mri", 1, (32, 32, 32), 8, 2),
            ),
            dim=64, heads=4, mlp=128,
            decoder_depth=2, decoder_dim=64, decoder_heads=4, decoder_mlp=128,
            clinical_features=("radiation", "chemo", "age"), clinical_hidden=32,
            fusion_heads=4,
        )
        return base.replace(**changes) if changes else base

    @classmethod
    def named(cls, name: str, **changes: Any) -> ModelConfig:
        """``"paper"`` or ``"small"``."""
        makers = {"paper": cls.paper, "small": cls.small}
        if name not in makers:
            raise ValueError(f"unknown configuration name {name!r}; choose one of {', '.join(makers)}")
        return makers[name](**changes)


def resolve_config(config: ModelConfig | str | Mapping[str, Any]) -> ModelConfig:
    """A :class:`ModelConfig` from itself, a name (``"paper"``, ``"small"``) or a :meth:`ModelConfig.to_dict` dict."""
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, str):
        return ModelConfig.named(config)
    if isinstance(config, Mapping):
        return ModelConfig.from_dict(config)
    raise TypeError(f"config must be a ModelConfig, a name or a dict, got {type(config).__name__}")

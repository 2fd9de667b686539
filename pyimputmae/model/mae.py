"""ImputeMAE: per-modality encoders, one shared decoder over all modalities' tokens, one head each.

Token layout (DESIGN.md §2): modality ``m`` owns tokens ``[o_m, o_m + L_m)`` of the joint sequence
of length ``L`` and visible slots ``[q_m, q_m + K_m)`` of the visible sequence of length ``K``.

Pre-training step (:meth:`ImputeMAE.forward_pretrain`), all shapes static, no host sync:

1. ``ids_keep (B, K), mask (B, L) = ops.random_keep(present, L_m, r_m, rng)`` — the masking choice
   before any token exists (1 = hidden, as MAE);
2. per modality, ``ops.patch_embed`` of only the kept patches, the CLS token, the encoder blocks
   (CLS dropped afterwards);
3. concatenate ``(B, K, D)``, project to the decoder width, ``ops.unshuffle_fill`` with the
   learnable, zero-initialised ``mask_token`` — a missing modality's slots are ``mask_token``
   throughout, whatever its encoder produced;
4. decoder positions (each modality's sin-cos grid positions plus a learnable modality embedding,
   so the decoder knows which modality a mask token stands for), the shared decoder;
5. per modality, a linear head to ``P_m = C·p^k`` values per patch and ``ops.masked_mse`` on the
   hidden patches of the present rows; summed over modalities. A modality no row has gives
   exactly 0 (``masked_mse``'s contract), never NaN.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import ops
from ..reference.masked_mse import patch_target
from ..reference.patch_embed import unpatchify
from .config import ModelConfig, resolve_config
from .encoders import PatchEncoder
from .layers import Transformer, init_weights, sincos_pos_embed

#: offset bits reserved per data-parallel rank in :func:`new_rng` (2**40 steps per rank)
RANK_OFFSET_SHIFT = 40


def new_rng(seed: int = 0, device: torch.device | str | None = None, rank: int = 0) -> torch.Tensor:
    """The masking RNG state: ``(2,)`` int64 ``(seed, offset)`` on ``device``.

    Under data parallelism give each rank its own ``rank``: offsets then start at
    ``rank·2**40``, so ranks draw different masks. Advance it with :func:`advance_rng_` every step.
    """
    return torch.tensor([seed, rank << RANK_OFFSET_SHIFT], dtype=torch.int64, device=device)


def advance_rng_(rng: torch.Tensor, steps: int = 1) -> torch.Tensor:
    """``rng[1] += steps`` in place, on the device (no host sync; safe inside a CUDA graph). Returns ``rng``."""
    rng[1:].add_(steps)
    return rng


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put ``module`` in eval mode for the block and restore every submodule's own mode after."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def jsonable(obj: Any) -> Any:
    """``obj`` with tensors/arrays as lists and numpy scalars as Python numbers (for the saved state)."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def normalized_inputs(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``x: (B, C, *S)`` normalised per patch as the ``norm_pix`` pre-training target is (mean 0,
    unbiased variance 1 per patch of ``patch`` per spatial axis; ``masked_mse``'s ``norm_pix``):
    the unit in which a ``norm_pix`` model reconstructs, to compare its imputations with the truth.
    float32, same shape."""
    channels, grid = x.shape[1], tuple(s // patch for s in x.shape[2:])
    return unpatchify(patch_target(x, patch, norm_pix=True), channels, grid, patch)


#: per-patient content of a store's attributes that a model file does not keep
_PATIENT_KEYS = ("ids",)
_PATIENT_REPORT_KEYS = ("failures", "rejected", "warnings")


def model_preprocessing(attrs: Mapping[str, Any]) -> dict:
    """What a model keeps of its training store's attributes (``mae.preprocessing``): the fitted
    preprocessing and the store's description, without per-patient content (the patient ids and the
    report's failures, rejected rows and warnings), so a model file can be shared without its
    cohort's patient list."""
    kept = {k: v for k, v in attrs.items() if k not in _PATIENT_KEYS}
    if isinstance(kept.get("report"), Mapping):
        kept["report"] = {k: v for k, v in kept["report"].items() if k not in _PATIENT_REPORT_KEYS}
    return jsonable(kept)


class ImputeMAE(nn.Module):
    """The multimodal masked autoencoder of impuTMAE.

    ``ImputeMAE(config)`` with a :class:`ModelConfig`, a name (``"paper"``, ``"small"``) or a
    ``config.to_dict()`` dict. Save with ``state_dict()`` + ``config.to_dict()``; the state dict also
    carries :attr:`preprocessing` (the data preprocessing fitted on the training split: feature
    selection, normalisation statistics; JSON-able), so it travels with the weights.

    Batches are :class:`pyimputmae.data.Batch`: ``inputs[name]: (B, C, *S)`` (zeros where missing),
    ``present: (B, M)`` bool in ``batch.modalities`` order. A configured modality the batch does not
    carry counts as missing in every row; a batch modality the model does not know is an error.
    """

    def __init__(self, config: ModelConfig | str | Mapping[str, Any]) -> None:
        super().__init__()
        cfg = resolve_config(config)
        self.config = cfg
        self.names = cfg.names
        self.lengths, self.keeps, self.ratios = cfg.lengths, cfg.keeps, cfg.ratios
        self.offsets = tuple(int(v) for v in np.cumsum((0, *self.lengths))[:-1])
        self.vis_offsets = tuple(int(v) for v in np.cumsum((0, *self.keeps))[:-1])
        self.preprocessing: dict = {}

        self.encoders = nn.ModuleDict({
            m.name: PatchEncoder(m, cfg.dim, cfg.heads, cfg.mlp, cfg.dropout, cfg.pos_embed) for m in cfg.modalities
        })
        self.decoder_embed = nn.Linear(cfg.dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(cfg.decoder_dim))
        L = sum(self.lengths)
        if cfg.pos_embed == "sincos":
            pos = torch.cat([sincos_pos_embed(m.grid, cfg.decoder_dim) for m in cfg.modalities])
            self.register_buffer("decoder_pos", pos, persistent=False)
        else:
            self.decoder_pos = nn.Parameter(torch.zeros(L, cfg.decoder_dim))
        self.modality_embed = nn.Parameter(torch.zeros(len(self.names), cfg.decoder_dim))
        token_modality = torch.repeat_interleave(torch.arange(len(self.names)), torch.tensor(self.lengths))
        self.register_buffer("token_modality", token_modality, persistent=False)
        self.decoder = Transformer(cfg.decoder_depth, cfg.decoder_dim, cfg.decoder_heads, cfg.decoder_mlp, cfg.dropout)
        self.heads = nn.ModuleDict({m.name: nn.Linear(cfg.decoder_dim, m.patch_dim) for m in cfg.modalities})
        for module in (self.decoder_embed, self.decoder, self.heads):
            module.apply(init_weights)
        nn.init.normal_(self.modality_embed, std=0.02)

    # ------------------------------------------------------------------ inputs
    def gather_inputs(self, batch: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Check a batch against the configuration and put it in token-layout order.

        → ``inputs``: the batch's configured modalities, name → ``(B, C, *S)``; ``present: (B, M)``
        bool in the configured order (False for a modality the batch does not carry). Only shapes
        and names are checked here (no host sync); ValueError says what and where.
        """
        names = self.names
        unknown = [n for n in batch.inputs if n not in names]
        if unknown:
            raise ValueError(f"batch has modality {unknown[0]!r}, which the model is not configured with; "
                             f"configured: {', '.join(names)}")
        inputs = {n: batch.inputs[n] for n in names if n in batch.inputs}
        if not inputs:
            raise ValueError(f"batch carries none of the model's modalities ({', '.join(names)}): "
                             "no modality is present at all")
        order = tuple(batch.modalities)
        absent = [n for n in inputs if n not in order]
        if absent:
            raise ValueError(f"batch.inputs has {absent[0]!r} but batch.modalities {order} does not list it")
        present = batch.present
        if present.dim() != 2 or present.shape[1] != len(order):
            raise ValueError(f"batch.present must be (B, {len(order)}) for modalities {order}, "
                             f"got {tuple(present.shape)}")
        B = present.shape[0]
        for n, x in inputs.items():
            want = (B, *self.config.modality(n).shape)
            if tuple(x.shape) != want:
                axis = next((i for i, (a, b) in enumerate(zip(x.shape, want)) if a != b), min(x.dim(), len(want)))
                raise ValueError(f"modality {n!r}: input shape {tuple(x.shape)} does not match the configured "
                                 f"(B, C, *S) = {want} (first difference on axis {axis})")
        present = present.to(torch.bool)
        if order != names:
            cols = [present[:, order.index(n)] if n in inputs else present.new_zeros(B) for n in names]
            present = torch.stack(cols, 1)
        return inputs, present

    def check_any_present(self, present: torch.Tensor) -> None:
        """ValueError when no row has any modality (one host sync; skipped while compiling or capturing)."""
        if torch.compiler.is_compiling() or (present.is_cuda and torch.cuda.is_current_stream_capturing()):
            return
        if not bool(present.any()):
            raise ValueError(f"no patient in this batch has any of the modalities {', '.join(self.names)} "
                             "(batch.present is all False): nothing to encode or reconstruct")

    # ---------------------------------------------------------------- internals
    def _decode(self, visible: list[torch.Tensor | None], counts: tuple[int, ...], ids_keep: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """visible: per modality ``(B, counts[m], D)`` encoder outputs (None: not in the batch; its
        slots get zeros, which ``unshuffle_fill`` overwrites) → decoder output ``(B, L, D_dec)``."""
        ref = next(v for v in visible if v is not None)
        filled = [v if v is not None else ref.new_zeros(ref.shape[0], n, ref.shape[2])
                  for v, n in zip(visible, counts)]
        z = self.decoder_embed(torch.cat(filled, 1))
        full = ops.unshuffle_fill(z, ids_keep, mask, self.mask_token)
        pos = self.decoder_pos + self.modality_embed[self.token_modality]
        return self.decoder(full + pos.to(full.dtype))

    def _with_inputs(self, recon: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                     present: torch.Tensor) -> dict[str, torch.Tensor]:
        """Reconstructions ``(B, C, *S)`` with each row's own input where the row has the modality."""
        out = dict(recon)
        for i, name in enumerate(self.names):
            if name in inputs:
                r = recon[name]
                have = present[:, i].view(-1, *([1] * (r.dim() - 1)))
                out[name] = torch.where(have, inputs[name].to(r.dtype), r)
        return out

    def _segment(self, i: int, t: torch.Tensor) -> torch.Tensor:
        """Modality ``i``'s slice ``[o_m, o_m + L_m)`` of a ``(B, L, ...)`` tensor."""
        o = self.offsets[i]
        return t[:, o:o + self.lengths[i]]

    # --------------------------------------------------------------- pre-train
    def forward_pretrain(self, batch: Any, rng: torch.Tensor, *,
                         check: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One pre-training forward: masked reconstruction loss of every modality.

        batch: a :class:`~pyimputmae.data.Batch`; rng: ``(2,)`` int64 ``(seed, offset)`` on the
        batch's device (:func:`new_rng`; advance it every step with :func:`advance_rng_`).
        → ``loss`` (0-d fp32, the sum over modalities) and ``per_modality``: name → 0-d loss
        (``masked_mse`` over the hidden patches of the rows that have it; 0 for a modality no
        row has). ``check=False`` skips the one data-dependent check (a batch with no modality
        present at all; it costs a host sync) — it is skipped anyway under ``torch.compile`` and
        CUDA-graph capture. Nothing else syncs, so the step compiles with ``fullgraph=True``.
        """
        inputs, present = self.gather_inputs(batch)
        if check:
            self.check_any_present(present)
        ids_keep, mask = ops.random_keep(present, self.lengths, self.ratios, rng)
        visible: list[torch.Tensor | None] = []
        for i, name in enumerate(self.names):
            if name not in inputs:
                visible.append(None)
                continue
            q, o = self.vis_offsets[i], self.offsets[i]
            keep = ids_keep[:, q:q + self.keeps[i]] - o  # patch indices inside the modality
            visible.append(self.encoders[name](inputs[name], keep)[:, 1:])  # drop CLS
        decoded = self._decode(visible, self.keeps, ids_keep, mask)
        per_modality: dict[str, torch.Tensor] = {}
        for i, name in enumerate(self.names):
            if name not in inputs:
                per_modality[name] = torch.zeros((), device=decoded.device)
                continue
            pred = self.heads[name](self._segment(i, decoded))
            per_modality[name] = ops.masked_mse(pred, inputs[name], self._segment(i, mask), present[:, i],
                                                patch=self.config.modality(name).patch,
                                                norm_pix=self.config.norm_pix)
        loss = torch.stack(list(per_modality.values())).sum()
        return loss, per_modality

    # ----------------------------------------------------------------- impute
    def _reconstruct(self, inputs: dict[str, torch.Tensor], present: torch.Tensor) -> dict[str, torch.Tensor]:
        """Nothing hidden but the missing modalities → per modality the decoder's reconstruction
        ``(B, C, *S)`` (every row; per-patch normalised values when ``norm_pix``)."""
        # ratio 0: every token of a present modality is kept, in order, so the encoders embed every
        # patch (keep=None is the same selection); a missing modality is hidden throughout
        rng = torch.zeros(2, dtype=torch.int64, device=present.device)
        ids_keep, mask = ops.random_keep(present, self.lengths, 0.0, rng)
        visible = [self.encoders[n](inputs[n])[:, 1:] if n in inputs else None for n in self.names]
        decoded = self._decode(visible, self.lengths, ids_keep, mask)
        out = {}
        for i, m in enumerate(self.config.modalities):
            pred = self.heads[m.name](self._segment(i, decoded))
            out[m.name] = unpatchify(pred.float(), m.channels, m.grid, m.patch)
        return out

    @torch.no_grad()
    def impute(self, batch: Any, *, keep_present: bool = True) -> dict[str, torch.Tensor]:
        """Reconstruct the missing modalities, deterministically (no random masking, eval mode).

        Every token of every present modality is visible; a missing modality is ``mask_token``
        throughout and the decoder reconstructs it from the others. → name → ``(B, C, *S)`` float32
        for every configured modality: the reconstruction where the row lacks the modality and,
        with ``keep_present`` (default), the row's own input where it has it (False: the decoder's
        output everywhere). With ``norm_pix`` the model learned per-patch normalised targets, so
        reconstructions are per-patch normalised (mean 0, variance 1 per patch), not raw values,
        and with ``keep_present`` the rows' own inputs are given normalised the same way
        (:func:`normalized_inputs`): every value of the output is in one unit.
        A row with none of the modalities (clinical data only) has nothing to impute from: its
        rows are NaN in every modality (also when no row of the batch has any). Repeated calls give
        identical output.
        """
        inputs, present = self.gather_inputs(batch)
        has_any = present.any(1)
        if not bool(has_any.any()):  # nothing to encode: the decoder would only echo its mask token
            return {m.name: torch.full((present.shape[0], *m.shape), float("nan"), device=present.device)
                    for m in self.config.modalities}
        with eval_mode(self):
            recon = self._reconstruct(inputs, present)
        if keep_present and self.config.norm_pix:
            inputs = {n: normalized_inputs(x, self.config.modality(n).patch) for n, x in inputs.items()}
        out = self._with_inputs(recon, inputs, present) if keep_present else recon
        return {name: v.masked_fill(~has_any.view(-1, *([1] * (v.dim() - 1))), float("nan"))
                for name, v in out.items()}

    # ------------------------------------------------------------------ encode
    def encode(self, batch: Any, missing: str = "mask") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Encoder features for fine-tuning (no masking).

        missing="mask": a missing modality is excluded; missing="impute": it is first reconstructed
        by the decoder (:meth:`impute`, without gradient) and then encoded like a real input.
        → ``features``: name → ``(B, 1 + L_m, D)`` (CLS token first, after the final LayerNorm; zeros
        for a modality the batch does not carry, with "mask") and ``excluded: (B, M)`` bool, True
        where attention must ignore the modality (its features are meaningless there; all False
        with "impute").
        """
        if missing not in ("mask", "impute"):
            raise ValueError(f"missing must be 'mask' or 'impute', got {missing!r}")
        inputs, present = self.gather_inputs(batch)
        if missing == "impute":
            with torch.no_grad(), eval_mode(self):
                recon = self._reconstruct(inputs, present)
            inputs, excluded = self._with_inputs(recon, inputs, present), torch.zeros_like(present)
        else:
            excluded = ~present
        features = {n: self.encoders[n](inputs[n]) for n in self.names if n in inputs}
        ref = next(iter(features.values()))
        for i, name in enumerate(self.names):
            if name not in features:
                features[name] = ref.new_zeros(ref.shape[0], 1 + self.lengths[i], ref.shape[2])
        return {n: features[n] for n in self.names}, excluded

    # ------------------------------------------------------------ saved state
    def get_extra_state(self) -> dict:
        return {"preprocessing": jsonable(self.preprocessing)}

    def set_extra_state(self, state: dict) -> None:
        self.preprocessing = dict(state.get("preprocessing", {}))

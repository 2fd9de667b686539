"""The built-in synthetic cohort: multimodal glioma-like patients driven by shared latent factors.

Every patient has ``n_latent`` standard-normal factors ``z``. They drive

- the hazard (Weibull proportional hazards: ``log h = z·β + age, treatment effects``), so survival
  is learnable from anything that reflects ``z``;
- the content of every modality, each seeing its own subset of factors strongly (plus two
  private factors and noise), so one modality is partly — not fully — predictable from another
  and imputing a missing one is meaningful;
- age and treatment (age correlates with the latent risk, treatment is given more often to
  high-risk patients), so a Cox model on clinical covariates alone has some signal, but less
  than a model that reads the modalities.

Modality generators are chosen by spatial rank, so any shape works (the paper's too):
1-D ``(C, L)`` → omics vectors (genes in blocks loading on factors; ``"dnam"`` gives beta values
in [0, 1]), 2-D ``(C, H, W)`` → an H&E-like slide tile in [0, 1] (stain densities from a few
sinusoid textures whose frequency, contrast and stain balance follow the factors), 3-D
``(C, D, H, W)`` → a brain-like MRI volume with a tumour (position, size, enhancement and
necrosis follow the factors), z-scored inside the brain.

Availability follows the real TCGA GBM/LGG cohort's joint pattern by default, or is read
patient by patient (with split and folds) from the real cohort table.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .cohort import Cohort

__all__ = ["CLINICAL_NAMES", "DEFAULT_SHAPES", "make_cohort"]

#: ``ModelConfig.small()``'s input shapes.
DEFAULT_SHAPES: dict[str, tuple[int, ...]] = {
    "rna": (1, 1024),
    "dnam": (1, 1536),
    "wsi": (3, 64, 64),
    "mri": (1, 32, 32, 32),
}
CLINICAL_NAMES = ["radiation", "chemo", "age"]

# Joint availability (rna, dnam, wsi, mri) → number of patients in the real TCGA GBM/LGG cohort
# (1,104 patients; ../shared/data/tcga_gbmlgg_cohort.csv): RNA 664, DNAm 923, WSI 870, MRI 165,
# all four 74, none of them 28.
_TCGA_PATTERNS: dict[tuple[int, int, int, int], int] = {
    (0, 0, 0, 0): 28, (0, 0, 0, 1): 10, (0, 0, 1, 0): 94, (0, 0, 1, 1): 20,
    (0, 1, 0, 0): 93, (0, 1, 0, 1): 21, (0, 1, 1, 0): 145, (0, 1, 1, 1): 29,
    (1, 0, 0, 0): 1, (1, 0, 1, 0): 20, (1, 0, 1, 1): 8,
    (1, 1, 0, 0): 78, (1, 1, 0, 1): 3, (1, 1, 1, 0): 480, (1, 1, 1, 1): 74,
}  # fmt: skip
_TCGA_MODALITIES = ("rna", "dnam", "wsi", "mri")
# Unknown clinical values in the real cohort: radiation 59, chemo 93, age 1 of 1,104.
_TCGA_CLINICAL_MISSING = {"radiation": 59 / 1104, "chemo": 93 / 1104, "age": 1 / 1104}
_TCGA_TEST_FRACTION = 218 / 1104
_N_FOLDS = 5

# Survival model. Weibull proportional hazards; the scale is set so that the median survival
# time of the cohort is _MEDIAN_YEARS; follow-up ends at _MAX_FOLLOW_UP; an independent
# exponential censoring, its rate solved for, gives the requested event rate.
_WEIBULL_SHAPE = 1.2
_MEDIAN_YEARS = 2.5
_MAX_FOLLOW_UP = 15.0
_LATENT_RISK_SD = 1.5  # sd of z·β, the part of the log-hazard only the modalities see fully
_AGE_EFFECT = 0.015  # log-hazard per year of age (direct effect, on top of its latent part)
_TREATMENT_EFFECT = {"radiation": -0.25, "chemo": -0.2}
_AGE_LATENT_CORR = 0.4  # cosine between the latent direction of age and β
_TREATMENT_BY_RISK = 0.4  # high-risk patients are treated more often (logit slope per risk sd)
_N_PRIVATE = 2  # factors of a modality that nothing else sees
_CHUNK = 64  # patients per chunk when rendering images and volumes (bounds temporary memory)


def make_cohort(
    n_patients: int = 1104,
    shapes: dict[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    availability: str | dict[str, float] = "tcga",
    cohort_csv: str | Path | None = None,
    n_latent: int = 8,
    device: torch.device | str = "cpu",
    event_rate: float = 0.4,
) -> Cohort:
    """Generate a synthetic multimodal survival cohort (deterministic for a seed).

    n_patients: cohort size (ignored with ``cohort_csv``, whose row count wins).
    shapes: modality name → ``(C, *S)`` with 1 to 3 spatial dims; default :data:`DEFAULT_SHAPES`.
    availability: ``"tcga"`` draws whole presence patterns with the real cohort's joint
    frequencies (modalities outside rna/dnam/wsi/mri are always present), or name → fraction,
    independent per modality (a name left out is always present).
    cohort_csv: the real cohort table (``tcga_gbmlgg_cohort.csv``): per-patient availability
    (``has_<name>``; a modality without that column is always present), split, folds and which
    clinical values are unknown are taken row by row from it; row ``i`` of the cohort is row ``i``
    of the table. Content and survival stay synthetic.
    n_latent: number of shared latent factors; event_rate: fraction of observed deaths.

    Returns a :class:`Cohort`: ``inputs[name]`` ``(N, C, *S)`` float32 (zeros where missing),
    ``present`` ``(N, M)``, clinical ``(N, 3)`` = radiation (0/1), chemo (0/1), age (years), NaN
    where unknown; time in years, event 0/1; split ``"train"``/``"test"``; fold 0–4 on train
    (−1 elsewhere); ``attrs`` = the generator's parameters.
    """
    shapes = dict(DEFAULT_SHAPES if shapes is None else shapes)
    for name, shape in shapes.items():
        if len(shape) not in (2, 3, 4) or any(int(s) < 1 for s in shape):
            raise ValueError(f"shape of {name!r} must be (C, *S) with 1 to 3 spatial dims, got {tuple(shape)}")
    if n_latent < 1:
        raise ValueError(f"n_latent must be at least 1, got {n_latent}")
    if not 0.0 < event_rate < 1.0:
        raise ValueError(f"event_rate must lie in (0, 1), got {event_rate}")
    names = list(shapes)
    rng = np.random.default_rng(seed)

    if cohort_csv is not None:
        n, present, split, fold, clinical_missing = _layout_from_csv(Path(cohort_csv), names)
    else:
        n = int(n_patients)
        if n < 2:
            raise ValueError(f"n_patients must be at least 2, got {n}")
        present = _draw_availability(rng, n, names, availability)
        split, fold = _draw_split(rng, n)
        clinical_missing = {k: _exact_mask(rng, n, f) for k, f in _TCGA_CLINICAL_MISSING.items()}

    z = rng.standard_normal((n, n_latent))
    beta = _unit(rng.standard_normal(n_latent) / np.sqrt(1.0 + np.arange(n_latent))) * _LATENT_RISK_SD
    latent_risk = z @ beta
    clinical, clin_params = _draw_clinical(rng, z, beta, latent_risk)
    log_hazard = (
        latent_risk
        + _AGE_EFFECT * (clinical[:, 2] - 50.0)
        + _TREATMENT_EFFECT["radiation"] * clinical[:, 0]
        + _TREATMENT_EFFECT["chemo"] * clinical[:, 1]
    )
    time, event, surv_params = _draw_survival(rng, log_hazard, event_rate)
    for j, key in enumerate(CLINICAL_NAMES):  # unknown values are hidden after they shaped the hazard
        clinical[clinical_missing[key], j] = np.nan

    inputs: dict[str, torch.Tensor] = {}
    modality_params: dict[str, dict] = {}
    for m, name in enumerate(names):
        shape = tuple(int(s) for s in shapes[name])
        strong = _strong_factors(rng, n_latent)
        sens = np.where(strong, 1.0, 0.25)
        private = rng.standard_normal((n, _N_PRIVATE))
        gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        rows = np.flatnonzero(present[:, m])
        out = torch.zeros((n, *shape), dtype=torch.float32)
        if rows.size:
            view = np.concatenate([z[rows] * sens, private[rows]], axis=1)  # (n_m, K + private)
            if len(shape) == 2:
                content = _render_omics(rng, gen, view, shape, beta_values=name == "dnam")
            elif len(shape) == 3:
                content = _render_tile(rng, gen, view, shape)
            else:
                content = _render_volume(rng, gen, view, shape)
            out[torch.as_tensor(rows)] = content
        inputs[name] = out
        modality_params[name] = {"shape": list(shape), "strong_factors": np.flatnonzero(strong).tolist(),
                                 "present": int(rows.size)}

    attrs = {
        "source": "synthetic",
        "generator": "pyimputmae.data.synthetic.make_cohort",
        "seed": int(seed),
        "n_patients": int(n),
        "n_latent": int(n_latent),
        "availability": "cohort_csv" if cohort_csv is not None else availability,
        "cohort_csv": None if cohort_csv is None else str(cohort_csv),
        "time_unit": "years",
        "modalities": modality_params,
        "hazard": {
            "latent_coef": beta.tolist(),
            "age_per_year": _AGE_EFFECT,
            "radiation": _TREATMENT_EFFECT["radiation"],
            "chemo": _TREATMENT_EFFECT["chemo"],
        },
        "clinical": clin_params,
        "survival": surv_params,
    }
    cohort = Cohort(
        inputs=inputs,
        present=torch.as_tensor(present),
        clinical=torch.as_tensor(clinical, dtype=torch.float32),
        clinical_names=list(CLINICAL_NAMES),
        time=torch.as_tensor(time, dtype=torch.float32),
        event=torch.as_tensor(event, dtype=torch.float32),
        split=split,
        fold=fold,
        ids=[f"SYN-{i:05d}" for i in range(n)],
        attrs=attrs,
    )
    return cohort if torch.device(device).type == "cpu" else cohort.to(device)


# ----------------------------------------------------------------------------- layout


def _layout_from_csv(
    path: Path, names: list[str]
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Size, presence ``(N, M)``, split, fold and unknown-clinical masks of the real cohort table;
    a modality without a ``has_<name>`` column is present for everybody."""
    import pandas as pd

    if not path.is_file():
        raise FileNotFoundError(f"cohort table {path} does not exist")
    df = pd.read_csv(path)
    needed = {"split", "cv_fold", "age_years", "radiation", "chemo"}
    if missing := needed - set(df.columns):
        raise ValueError(f"{path} lacks the columns {sorted(missing)}")
    n = len(df)
    present = np.ones((n, len(names)), dtype=bool)
    for m, name in enumerate(names):
        if f"has_{name}" in df.columns:
            present[:, m] = df[f"has_{name}"].fillna(0).to_numpy().astype(bool)
    split = df["split"].astype(str).to_numpy()
    fold = df["cv_fold"].fillna(-1).to_numpy().astype(np.int64)
    fold[split != "train"] = -1
    clinical_missing = {
        "radiation": df["radiation"].isna().to_numpy(),
        "chemo": df["chemo"].isna().to_numpy(),
        "age": df["age_years"].isna().to_numpy(),
    }
    return n, present, split, fold, clinical_missing


def _draw_availability(rng: np.random.Generator, n: int, names: list[str], availability) -> np.ndarray:
    present = np.ones((n, len(names)), dtype=bool)
    if isinstance(availability, str):
        if availability != "tcga":
            raise ValueError(f"availability must be 'tcga' or a dict name → fraction, got {availability!r}")
        patterns = np.array(list(_TCGA_PATTERNS), dtype=bool)
        counts = _allocate(n, np.array(list(_TCGA_PATTERNS.values()), dtype=np.float64))
        rows = rng.permutation(np.repeat(patterns, counts, axis=0))
        for m, name in enumerate(names):
            if name in _TCGA_MODALITIES:
                present[:, m] = rows[:, _TCGA_MODALITIES.index(name)]
        return present
    for name, frac in availability.items():
        if name not in names:
            raise ValueError(f"availability names {name!r}, which is not a modality of {names}")
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"availability of {name!r} must lie in [0, 1], got {frac}")
        present[:, names.index(name)] = _exact_mask(rng, n, frac)
    return present


def _allocate(n: int, weights: np.ndarray) -> np.ndarray:
    """Integer counts summing to ``n`` proportional to ``weights`` (largest remainder)."""
    share = weights / weights.sum() * n
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(-(share - counts), kind="stable")[: n - counts.sum()]] += 1
    return counts


def _exact_mask(rng: np.random.Generator, n: int, frac: float) -> np.ndarray:
    """A random boolean mask with exactly ``round(frac · n)`` True entries."""
    mask = np.zeros(n, dtype=bool)
    mask[rng.permutation(n)[: round(frac * n)]] = True
    return mask


def _draw_split(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    n_test = min(max(round(_TCGA_TEST_FRACTION * n), 1), n - 1)
    order = rng.permutation(n)
    split = np.full(n, "train", dtype="<U5")
    split[order[:n_test]] = "test"
    fold = np.full(n, -1, dtype=np.int64)
    train = order[n_test:]
    fold[train] = np.arange(train.size) % _N_FOLDS
    return split, fold


# ------------------------------------------------------------------ clinical, survival


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _draw_clinical(rng: np.random.Generator, z: np.ndarray, beta: np.ndarray, latent_risk: np.ndarray):
    """Age (years) leaning on the latent risk, and treatments given more often to high-risk patients."""
    k = z.shape[1]
    other = rng.standard_normal(k)
    other -= other @ _unit(beta) * _unit(beta)
    rest = math.sqrt(1.0 - _AGE_LATENT_CORR**2)
    age_dir = _AGE_LATENT_CORR * _unit(beta) + (rest * _unit(other) if k > 1 else 0.0)
    age = np.clip(51.0 + 9.0 * (z @ age_dir) + 10.0 * rng.standard_normal(len(z)), 10.0, 90.0)
    risk = latent_risk / _LATENT_RISK_SD
    radiation = rng.uniform(size=len(z)) < _sigmoid(1.3 + _TREATMENT_BY_RISK * risk)
    chemo = rng.uniform(size=len(z)) < _sigmoid(1.1 + _TREATMENT_BY_RISK * risk)
    clinical = np.stack([radiation, chemo, np.round(age, 2)], axis=1).astype(np.float64)
    params = {"age": f"51 + 9·(z·a) + 10·noise, cos(a, beta) = {_AGE_LATENT_CORR}, clipped to [10, 90]",
              "radiation": f"Bernoulli(sigmoid(1.3 + {_TREATMENT_BY_RISK}·risk))",
              "chemo": f"Bernoulli(sigmoid(1.1 + {_TREATMENT_BY_RISK}·risk))", "risk": "z·beta / sd(z·beta)"}
    return clinical, params


def _draw_survival(rng: np.random.Generator, log_hazard: np.ndarray, event_rate: float):
    """Weibull PH death times, exponential censoring solved for ``event_rate``, follow-up ≤ 15 years;
    times rounded to whole days."""
    n = len(log_hazard)
    base = (rng.exponential(size=n) / np.exp(log_hazard - log_hazard.mean())) ** (1.0 / _WEIBULL_SHAPE)
    scale = _MEDIAN_YEARS / np.median(base)
    death = scale * base
    e_censor = rng.exponential(size=n)

    def observed_rate(log_rate: float) -> float:
        return float(np.mean(death <= np.minimum(e_censor / math.exp(log_rate), _MAX_FOLLOW_UP)))

    lo, hi = -12.0, 8.0  # log censoring rate per year; observed_rate decreases with it
    if observed_rate(lo) < event_rate:
        raise ValueError(f"event_rate {event_rate} is unreachable with {_MAX_FOLLOW_UP}-year follow-up")
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if observed_rate(mid) >= event_rate else (lo, mid)
    censor = np.minimum(e_censor / math.exp(lo), _MAX_FOLLOW_UP)
    event = death <= censor
    time = np.round(np.where(event, death, censor) * 365.25) / 365.25
    params = {"model": "Weibull proportional hazards", "weibull_shape": _WEIBULL_SHAPE,
              "weibull_scale_years": float(scale), "median_survival_years": _MEDIAN_YEARS,
              "censoring": "exponential", "censoring_rate_per_year": math.exp(lo),
              "max_follow_up_years": _MAX_FOLLOW_UP, "event_rate_target": event_rate,
              "event_rate": float(event.mean())}
    return time, event.astype(np.float64), params


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _strong_factors(rng: np.random.Generator, k: int) -> np.ndarray:
    """Which shared factors a modality sees strongly: about 70% of them, always factor 0."""
    strong = rng.uniform(size=k) < 0.7
    strong[0] = True
    return strong


# ----------------------------------------------------------------------- modalities


def _loadings(rng: np.random.Generator, n_in: int, n_out: int, block: int, per_block: int = 2) -> np.ndarray:
    """``(n_in, n_out)``: outputs in blocks of ``block`` share ``per_block`` input factors; each
    output scales its block's loading by a factor in [0.5, 1.5)."""
    n_blocks = -(-n_out // block)
    w = np.zeros((n_in, n_blocks))
    for b in range(n_blocks):
        chosen = rng.choice(n_in, size=min(per_block, n_in), replace=False)
        w[chosen, b] = rng.standard_normal(chosen.size)
    per_output = w[:, np.arange(n_out) // block] * rng.uniform(0.5, 1.5, size=n_out)
    return per_output


def _render_omics(
    rng: np.random.Generator, gen: torch.Generator, view: np.ndarray, shape: tuple[int, ...], beta_values: bool
) -> torch.Tensor:
    """Omics vectors ``(n, C, L)``: per-feature offset + block loadings on the view + noise; beta values
    (sigmoid of a bimodal offset + signal, in [0, 1]) for DNA methylation."""
    n, d = len(view), int(np.prod(shape))
    w = torch.as_tensor(_loadings(rng, view.shape[1], d, block=16), dtype=torch.float32)
    signal = torch.as_tensor(view, dtype=torch.float32) @ w
    noise = torch.randn((n, d), generator=gen)
    if beta_values:
        # CpG sites are mostly methylated or mostly unmethylated: offsets near ±2.
        offset = torch.as_tensor(rng.choice([-2.0, 2.0], size=d) + 0.5 * rng.standard_normal(d), dtype=torch.float32)
        x = torch.sigmoid(offset + 0.8 * signal + 0.5 * noise)
    else:
        offset = torch.as_tensor(rng.standard_normal(d), dtype=torch.float32)
        x = offset + signal + noise
    return x.reshape(n, *shape)


def _plane_waves(coef: torch.Tensor, kx: torch.Tensor, ky: torch.Tensor, phase: torch.Tensor, h: int, w: int):
    """Sums of plane waves ``Σ_k coef_k · cos(2π(kx_k·x + ky_k·y) + phase_k)`` on an ``h × w`` grid of
    the unit square; parameters ``(..., K)`` → ``(..., h, w)``.

    ``cos(a + b) = cos a cos b − sin a sin b`` makes each wave a rank-2 outer product, so the whole
    map is one batched matmul of ``(h, 2K)`` by ``(2K, w)`` factors instead of ``K`` full-size passes.
    """
    x = torch.linspace(0, 1, w)
    y = torch.linspace(0, 1, h)
    along_x = 2 * math.pi * kx.unsqueeze(-1) * x  # (..., K, w)
    along_y = 2 * math.pi * ky.unsqueeze(-1) * y + phase.unsqueeze(-1)  # (..., K, h)
    rows = torch.cat([coef.unsqueeze(-1) * torch.cos(along_y), -coef.unsqueeze(-1) * torch.sin(along_y)], -2)
    cols = torch.cat([torch.cos(along_x), torch.sin(along_x)], -2)
    return rows.transpose(-1, -2) @ cols


def _render_tile(
    rng: np.random.Generator, gen: torch.Generator, view: np.ndarray, shape: tuple[int, ...]
) -> torch.Tensor:
    """H&E-like tiles ``(n, C, H, W)`` in [0, 1] (Beer–Lambert mix of two stains).

    Haematoxylin density: a grid of "nuclei" (product of two perpendicular sinusoids) whose
    frequency and contrast follow the view, plus a finer texture; eosin: a smoother texture;
    stain amounts follow the view too. Orientation and phase are random per tile (no signal).
    """
    n = len(view)
    c, h, w = shape
    proj = torch.as_tensor(view @ (rng.standard_normal((view.shape[1], 6)) / np.sqrt(view.shape[1])),
                           dtype=torch.float32)  # (n, 6) tile parameters driven by the view
    if c == 3:  # Ruifrok & Johnston optical densities of haematoxylin and eosin (R, G, B)
        od = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11]])
    else:
        od = torch.as_tensor(rng.uniform(0.1, 1.0, size=(2, c)), dtype=torch.float32)
    out = torch.empty((n, c, h, w), dtype=torch.float32)
    for s in range(0, n, _CHUNK):
        p = proj[s : s + _CHUNK]
        b = len(p)
        theta = torch.rand((b, 2), generator=gen) * math.pi
        phase = torch.rand((b, 4), generator=gen) * 2 * math.pi
        f_nuc = 4.0 + 6.0 * torch.sigmoid(p[:, 0])  # cycles per tile side
        f_fine = 12.0 + 10.0 * torch.sigmoid(p[:, 1])
        contrast = 1.0 + 1.5 * torch.sigmoid(p[:, 2])
        # nuclei = sin(P)·sin(Q), P ⟂ Q, = ½cos(P − Q) − ½cos(P + Q): two plane waves.
        u = torch.stack([torch.cos(theta[:, 0]), torch.sin(theta[:, 0])], -1) * f_nuc[:, None]
        v = torch.stack([-u[:, 1], u[:, 0]], -1)
        fine = torch.stack([torch.cos(theta[:, 1]), torch.sin(theta[:, 1])], -1) * f_fine[:, None]
        stroma = 0.5 * fine * (f_nuc / f_fine)[:, None]
        zero, one = torch.zeros(b), torch.ones(b)
        # One (kx, ky, phase, coefficient) row per wave. Haematoxylin: nuclei (two waves) + fine
        # texture; eosin: stroma, padded with zero-coefficient waves to the same count.
        haematoxylin = [(u - v, phase[:, 0] - phase[:, 1], 0.5 * contrast),
                        (u + v, phase[:, 0] + phase[:, 1], -0.5 * contrast),
                        (fine, phase[:, 2] - math.pi / 2, 0.4 * one)]
        eosin = [(stroma, phase[:, 3], 0.7 * one), (stroma, zero, zero), (stroma, zero, zero)]
        params = torch.stack([torch.stack([torch.stack([k[:, 0], k[:, 1], ph, cf], -1) for k, ph, cf in stain], 1)
                              for stain in (haematoxylin, eosin)], 1)  # (b, 2 stains, 3 waves, 4)
        kx, ky, ph, coef = params.unbind(-1)
        level = torch.stack([0.6 * p[:, 3], 0.3 + 0.6 * p[:, 4]], 1).view(b, 2, 1, 1)
        density = torch.sigmoid(level + _plane_waves(coef, kx, ky, ph, h, w))  # (b, 2, h, w)
        amount = (1.2 + 0.4 * torch.tanh(p[:, 5])).view(b, 1, 1, 1)
        optical = torch.einsum("bshw,sc->bchw", density, od) * amount
        pixels = torch.exp(-optical).add_(torch.randn((b, c, h, w), generator=gen), alpha=0.03)
        out[s : s + b] = pixels.clamp_(0.0, 1.0)
    return out


def _render_volume(
    rng: np.random.Generator, gen: torch.Generator, view: np.ndarray, shape: tuple[int, ...]
) -> torch.Tensor:
    """Brain-like volumes ``(n, C, D, H, W)`` with a tumour, z-scored inside the brain (0 outside).

    Tumour centre, radius, enhancement and necrotic core follow the view; the brain's shape and
    its slow intensity variation are random per patient. Channel ``c`` weighs brain, enhancement
    and necrosis with its own contrast (channel 0: 1, 1, 1). Every radial term is a sum of
    per-axis terms, so it is built by broadcasting 1-D profiles.
    """
    n = len(view)
    c, *spatial = shape
    proj = torch.as_tensor(view @ (rng.standard_normal((view.shape[1], 6)) / np.sqrt(view.shape[1])),
                           dtype=torch.float32)
    contrast = torch.ones((c, 3))
    if c > 1:
        contrast[1:] = torch.as_tensor(rng.uniform(0.5, 1.5, size=(c - 1, 3)) * rng.choice([-1, 1], size=(c - 1, 3)),
                                       dtype=torch.float32)
    axes = [torch.linspace(-1, 1, s) for s in spatial]

    def per_axis(values: list[torch.Tensor]) -> torch.Tensor:
        """Sum of three ``(b, S_a)`` profiles broadcast to ``(b, D, H, W)``."""
        a, b_, c_ = values
        return a[:, :, None, None] + b_[:, None, :, None] + c_[:, None, None, :]

    out = torch.zeros((n, c, *spatial), dtype=torch.float32)
    for s in range(0, n, _CHUNK):
        p = proj[s : s + _CHUNK]
        b = len(p)
        radii = 0.8 + 0.1 * torch.rand((b, 3), generator=gen)
        phase = torch.rand((b, 3), generator=gen) * 2 * math.pi
        centre = 0.35 * torch.tanh(p[:, :3])
        radius = (0.15 + 0.25 * torch.sigmoid(p[:, 3])).view(b, 1, 1, 1)
        enhance = (0.6 + 0.8 * torch.sigmoid(p[:, 4])).view(b, 1, 1, 1)
        necrosis = (0.9 * torch.sigmoid(p[:, 5])).view(b, 1, 1, 1)
        inside = per_axis([(ax / radii[:, i : i + 1]) ** 2 for i, ax in enumerate(axes)]) <= 1.0
        slow = 1.0 + per_axis([0.05 * torch.sin(2.0 * ax + phase[:, i : i + 1]) for i, ax in enumerate(axes)])
        dist2 = per_axis([(ax - centre[:, i : i + 1]) ** 2 for i, ax in enumerate(axes)])
        tumour = torch.exp(-2.0 * dist2 / radius**2)
        core = tumour ** (1.0 / 0.55**2)  # the same Gaussian at 0.55 of the radius
        parts = [slow, enhance * tumour, -necrosis * enhance * core]
        vol = torch.stack([sum(w * part for w, part in zip(contrast[ch].tolist(), parts)) for ch in range(c)], 1)
        vol.add_(torch.randn(vol.shape, generator=gen), alpha=0.05)
        mask = inside.unsqueeze(1).to(vol.dtype)
        count = mask.sum((2, 3, 4), keepdim=True).clamp_min(1.0)
        mean = (vol * mask).sum((2, 3, 4), keepdim=True) / count
        vol.sub_(mean)
        std = ((vol * vol * mask).sum((2, 3, 4), keepdim=True) / count).sqrt().clamp_min(1e-6)
        out[s : s + b] = vol.div_(std).mul_(mask)
    return out

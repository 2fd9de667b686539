"""``pyimputmae demo``: the whole method on the built-in synthetic cohort, in minutes on a laptop CPU.

Pre-trains and fine-tunes the small configuration on a 1,104-patient synthetic cohort whose
modality availability follows the real TCGA GBM/LGG pattern (RNA 60%, DNAm 84%, WSI 79%, MRI 15%),
fits a Cox model on the clinical covariates on the same split, and writes to ``--out``:
``metrics.json``, ``km_risk_groups.png`` (Kaplan–Meier curves of the predicted low/high-risk halves
of the test set) and ``imputation.png`` (a held-out MRI reconstructed from the other modalities,
and a held-out RNA profile against its reconstruction). ``--seeds N --ablation`` repeats it over
N seeds and adds the same network fine-tuned without pre-training, with mean ± sd per arm.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._atomic import atomic_write_text
from .baselines import coxph_clinical
from .checkpoint import json_text
from .data.cohort import Cohort
from .data.synthetic import make_cohort
from .model.config import ModelConfig
from .plots import new_figure, plot_risk_groups, save_figure
from .training import TrainResult, train

#: Settings of the demo's training runs (small model; sized for ~2 minutes per arm on 2 CPU cores).
DEMO_SETTINGS: dict[str, Any] = {
    "pretrain_epochs": 15,
    "pretrain_batch_size": 64,
    "pretrain_lr": 1e-3,
    "pretrain_warmup_epochs": 2.0,
    "finetune_epochs": 12,
    "finetune_batch_size": 32,
    "finetune_lr": 5e-4,
    "checkpoint_every": 100,
    "log_every": 10,
}
#: Fewer deaths than this in a seed's test split get a warning: the C-index and CS-score compare
#: pairs anchored on deaths, so with a handful of them a value can swing far by chance (30 patients
#: give ~6 test patients and 1–3 deaths, where a C-index of 1.000 is luck). The default 1,104
#: patients give ~85; --patients 300 gives ~20.
MIN_TEST_EVENTS = 20
#: Below this the synthetic cohort's splits are too small to train and evaluate at all (a test
#: split needs deaths to compute a C-index): 30 patients give ~24 to train on and ~6 to test.
MIN_PATIENTS = 30
#: The demo's fine-tuning lets every encoder train (a small model on a small cohort; the paper's
#: freezing assumes long pre-training at full size).
DEMO_MODEL = {"freeze": "none"}


def demo_config() -> ModelConfig:
    return ModelConfig.small(**DEMO_MODEL)


def plot_imputation(model, cohort: Cohort, test_idx: np.ndarray, path: Path) -> dict[str, Any]:
    """Hide a test patient's MRI (then RNA), impute it from the rest, and plot it against the truth."""
    names = list(cohort.modalities)
    present = cohort.present[torch.as_tensor(test_idx)].cpu().numpy()
    mri, rna = names.index("mri"), names.index("rna")
    rows = [int(i) for i, p in zip(test_idx, present) if p[mri] and p[rna] and p.sum() >= 3]
    if not rows:
        rows = [int(i) for i, p in zip(test_idx, present) if p[mri] and p[rna]]
    if not rows:
        return {"skipped": "no test patient has both MRI and RNA"}
    row = rows[0]
    device = next(model.parameters()).device
    out: dict[str, Any] = {"patient": cohort.ids[row]}
    recon = {}
    for name in ("mri", "rna"):
        batch = cohort.batch(np.array([row])).to(device)
        batch.present = batch.present.clone()
        batch.present[0, names.index(name)] = False  # held out: the model must impute it
        recon[name] = model.mae.impute(batch)[name][0].cpu()
    true_mri = cohort.inputs["mri"][row, 0].cpu()
    rec_mri = recon["mri"][0]
    true_rna = cohort.inputs["rna"][row].reshape(-1).cpu().numpy()
    rec_rna = recon["rna"].reshape(-1).numpy()
    out["mri_corr"] = float(np.corrcoef(true_mri.reshape(-1).numpy(), rec_mri.reshape(-1).numpy())[0, 1])
    out["rna_corr"] = float(np.corrcoef(true_rna, rec_rna)[0, 1])
    z = true_mri.shape[0] // 2
    fig = new_figure(figsize=(11, 3.6))
    axes = fig.subplots(1, 3)
    lim = float(max(true_mri.abs().max(), rec_mri.abs().max()))
    axes[0].imshow(true_mri[z].numpy(), cmap="gray", vmin=-lim, vmax=lim)
    axes[0].set_title("MRI, true (central slice)")
    axes[1].imshow(rec_mri[z].numpy(), cmap="gray", vmin=-lim, vmax=lim)
    axes[1].set_title(f"MRI imputed from the rest (r = {out['mri_corr']:.2f})")
    for ax in axes[:2]:
        ax.axis("off")
    axes[2].scatter(true_rna, rec_rna, s=3, alpha=0.5)
    lo, hi = float(min(true_rna.min(), rec_rna.min())), float(max(true_rna.max(), rec_rna.max()))
    axes[2].plot([lo, hi], [lo, hi], "k--", lw=0.8)
    axes[2].set_xlabel("true RNA value")
    axes[2].set_ylabel("imputed RNA value")
    axes[2].set_title(f"RNA held out, imputed (r = {out['rna_corr']:.2f})")
    fig.suptitle(f"Imputation of held-out modalities, test patient {out['patient']}")
    fig.tight_layout()
    save_figure(fig, path)
    return out


def _summary(values: list[float]) -> dict[str, float | None]:
    """Mean and sample sd over the seeds (sd None for one seed: there is no spread to measure)."""
    arr = np.asarray(values, dtype=np.float64)
    return {"mean": float(arr.mean()), "sd": float(arr.std(ddof=1)) if arr.size > 1 else None, "n": int(arr.size)}


def _deaths(n: int) -> str:
    return "1 death" if n == 1 else f"{n} deaths"


#: what each entry of metrics.json holds (written into the file itself)
KEYS = {
    "summary": "per arm and metric, mean and sample sd over all seeds (sd null for one seed): the headline numbers",
    "per_seed": "per arm, the test metrics of every seed, in the order of seed_list",
    "test": "impuTMAE's test metrics of the first seed only (test_seed), kept for older readers; see summary",
    "baselines": "the other arms' test metrics of the first seed only (test_seed); see summary",
    "test_split": "per seed, how many patients and deaths the test split has",
    "figures": "the figures, drawn from the first seed's model and cohort",
    "warnings": "anything that makes the numbers less trustworthy (e.g. a tiny test split)",
}


def run_demo(out_dir: str | Path = "pyimputmae-demo", seeds: int = 1, ablation: bool = False,
             n_patients: int = 1104, device: str = "auto", progress: bool = True,
             **settings: Any) -> dict[str, Any]:
    """Run the demo; returns what ``metrics.json`` holds (its ``"keys"`` entry says what each part
    is). ``settings`` override :data:`DEMO_SETTINGS`."""
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    if n_patients < MIN_PATIENTS:
        raise ValueError(f"n_patients must be at least {MIN_PATIENTS}, got {n_patients}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = demo_config()
    shapes = {m.name: m.shape for m in cfg.modalities}
    arms: dict[str, list[dict[str, float]]] = {"impumae": [], "no_pretraining": [], "coxph_clinical": []}
    first: TrainResult | None = None
    first_cohort: Cohort | None = None
    test_split: list[dict[str, int]] = []
    t0 = time.perf_counter()
    for seed in range(seeds):
        cohort = make_cohort(n_patients=n_patients, shapes=shapes, seed=seed)
        test_rows = torch.as_tensor(cohort.indices("test"))
        test_split.append({"seed": seed, "patients": len(test_rows), "events": int(cohort.event[test_rows].sum())})
        if test_split[-1]["events"] == 0:  # no C-index without a death to rank the others against
            raise ValueError(f"the test split of seed {seed} has {len(test_rows)} patients and no death: nothing "
                             "to evaluate; use more patients")
        # a demo run replaces the previous one's outputs in the same folder
        common = {**DEMO_SETTINGS, "overwrite": True, **settings, "model": cfg, "seed": seed, "device": device,
                  "progress": progress}
        res = train(cohort=cohort, out_dir=str(out / f"seed{seed}" / "impumae"), **common)
        arms["impumae"].append(res.metrics["test"])
        if ablation:
            res_np = train(cohort=cohort, out_dir=str(out / f"seed{seed}" / "no_pretraining"),
                           **{**common, "pretrain": False})
            arms["no_pretraining"].append(res_np.metrics["test"])
        train_idx, test_idx = cohort.indices("train"), cohort.indices("test")
        arms["coxph_clinical"].append(coxph_clinical(cohort, train_idx, test_idx,
                                                     time_grid=res.model.cuts.cpu().numpy()))
        if first is None:
            first, first_cohort = res, cohort
    assert first is not None and first_cohort is not None
    test_idx = first_cohort.indices("test")
    figures = {
        "km_risk_groups": plot_risk_groups(first.model, first_cohort, test_idx, out / "km_risk_groups.png"),
        "imputation": plot_imputation(first.model, first_cohort, test_idx, out / "imputation.png"),
    }
    keys = ("c_index", "cs_score", "ibs", "harrell_c")
    cautions = [f"the test split of seed {t['seed']} has {t['patients']} patients and {_deaths(t['events'])}: with "
                f"fewer than {MIN_TEST_EVENTS} deaths its C-index and CS-score can swing far by chance (run with "
                "--patients 300 or more)" for t in test_split if t["events"] < MIN_TEST_EVENTS]
    result: dict[str, Any] = {
        "summary": {arm: {k: _summary([m[k] for m in ms]) for k in keys} for arm, ms in arms.items() if ms},
        "seeds": seeds,
        "seed_list": list(range(seeds)),
        "per_seed": {k: v for k, v in arms.items() if v},
        "test_seed": 0,
        "test": arms["impumae"][0],
        "baselines": {"coxph_clinical": arms["coxph_clinical"][0]},
        "test_split": test_split,
        "warnings": cautions,
        "keys": KEYS,
        "figures": figures,
        "settings": {**DEMO_SETTINGS, **settings, "n_patients": n_patients, "model": cfg.to_dict()},
        "seconds": time.perf_counter() - t0,
    }
    if ablation:
        result["baselines"]["no_pretraining"] = arms["no_pretraining"][0]
    atomic_write_text(out / "metrics.json", json_text(result, indent=1))
    return result


def render(result: dict[str, Any]) -> str:
    """The demo's table: per arm, test C-index / CS-score / IBS / Harrell's C (one seed: its values;
    several: mean ± sd over the seeds), then the run's warnings."""
    labels = {"impumae": "impuTMAE (pre-trained)", "no_pretraining": "same network, no pre-training",
              "coxph_clinical": "Cox PH, clinical covariates"}
    seeds = result["seeds"]
    title = "test split, 1 seed" if seeds == 1 else f"test split, {seeds} seeds: mean ± sd"
    lines = [title, f"{'model':34s} {'C-index':>15s} {'CS-score':>15s} {'IBS':>15s} {'Harrell C':>15s}"]
    for arm, stats in result["summary"].items():
        cells = [f"{stats[k]['mean']:.3f}" + (f" ± {stats[k]['sd']:.3f}" if stats[k]["sd"] is not None else "")
                 for k in ("c_index", "cs_score", "ibs", "harrell_c")]
        lines.append(f"{labels[arm]:34s} " + " ".join(f"{c:>15s}" for c in cells))
    lines += [f"warning: {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)

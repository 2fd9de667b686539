"""The synthetic cohort: layout, availability, determinism, and that it is worth learning from —
survival is predictable from the modalities (more than from clinical covariates) and one
modality is partly predictable from another."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pyimputmae.baselines import clinical_design_matrix, coxph_clinical
from pyimputmae.data.synthetic import CLINICAL_NAMES, DEFAULT_SHAPES, make_cohort

COHORT_CSV = Path(__file__).resolve().parents[2] / "shared" / "data" / "tcga_gbmlgg_cohort.csv"
TINY = {"rna": (1, 32), "dnam": (1, 48), "wsi": (3, 16, 16), "mri": (1, 8, 8, 8)}


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(seed=0)


def principal_components(x: torch.Tensor, fit_rows: np.ndarray, k: int) -> np.ndarray:
    """Top-``k`` principal-component scores ``(N, k)`` of ``x`` ``(N, ...)``, fitted on ``fit_rows``
    (randomised SVD: images have tens of thousands of features)."""
    x = x.reshape(len(x), -1).double()
    mean = x[fit_rows].mean(0)
    torch.manual_seed(0)
    _, s, v = torch.svd_lowrank(x[fit_rows] - mean, q=k + 8, niter=3)
    return ((x - mean) @ v[:, :k] / s[:k]).numpy() * np.sqrt(len(fit_rows))


def test_layout_of_the_default_cohort(cohort):
    n = 1104
    assert len(cohort) == n and cohort.modalities == tuple(DEFAULT_SHAPES)
    for m, (name, shape) in enumerate(DEFAULT_SHAPES.items()):
        x = cohort.inputs[name]
        assert x.shape == (n, *shape) and x.dtype == torch.float32
        missing = ~cohort.present[:, m]
        assert torch.all(x[missing] == 0), f"{name}: a missing modality must hold zeros"
        assert torch.all(x[~missing].flatten(1).abs().sum(1) > 0)
    assert cohort.present.dtype == torch.bool and cohort.clinical_names == CLINICAL_NAMES
    assert cohort.clinical.shape == (n, 3) and torch.isnan(cohort.clinical).any(0).all()
    assert set(np.unique(cohort.split)) == {"train", "test"}
    assert (cohort.split == "train").sum() == 886
    assert sorted(np.unique(cohort.fold[cohort.split == "train"])) == [0, 1, 2, 3, 4]
    assert np.all(cohort.fold[cohort.split == "test"] == -1)
    json.dumps(cohort.attrs)  # provenance must be storable as-is


def test_value_ranges_and_survival_scale(cohort):
    def present(name):
        return cohort.inputs[name][cohort.present[:, cohort.modalities.index(name)]]

    dnam, wsi, mri = present("dnam"), present("wsi"), present("mri")
    assert dnam.min() >= 0 and dnam.max() <= 1, "DNA methylation must be beta values"
    assert wsi.min() >= 0 and wsi.max() <= 1, "slide tiles must be pixels in [0, 1]"
    brain = mri != 0
    assert abs(mri[brain].mean()) < 0.05 and abs(mri[brain].std() - 1) < 0.05, "MRI must be z-scored in the brain"
    t, e = cohort.time.numpy(), cohort.event.numpy()
    assert t.min() >= 0 and 10 < t.max() <= 15.01
    assert set(np.unique(e)) == {0.0, 1.0} and abs(e.mean() - 0.4) < 0.01
    assert 2.0 <= cohort.attrs["survival"]["median_survival_years"] <= 3.0


def test_default_availability_is_the_tcga_pattern(cohort):
    counts = cohort.present.sum(0).tolist()
    assert counts == [664, 923, 870, 165]  # RNA, DNAm, WSI, MRI of the real 1,104 patients
    assert int(cohort.present.all(1).sum()) == 74 and int((~cohort.present).all(1).sum()) == 28


def test_tcga_pattern_scales_with_cohort_size():
    small = make_cohort(n_patients=300, shapes=TINY, seed=3)
    np.testing.assert_allclose(small.present.float().mean(0).numpy(), [0.60, 0.84, 0.79, 0.15], atol=0.01)


def test_availability_fractions_from_a_dict():
    c = make_cohort(n_patients=200, shapes=TINY, availability={"rna": 0.5, "mri": 0.1}, seed=1)
    assert c.present.sum(0).tolist() == [100, 200, 200, 20]


def test_same_seed_same_cohort_other_seed_other_cohort():
    a, b = make_cohort(64, TINY, seed=7), make_cohort(64, TINY, seed=7)
    c = make_cohort(64, TINY, seed=8)
    for name in TINY:
        assert torch.equal(a.inputs[name], b.inputs[name])
        assert not torch.equal(a.inputs[name], c.inputs[name])
    assert torch.equal(a.present, b.present) and torch.equal(a.time, b.time)
    assert torch.equal(a.clinical.nan_to_num(-1), b.clinical.nan_to_num(-1))
    assert not torch.equal(a.time, c.time)


def test_any_shapes_and_extra_modalities():
    shapes = {"rna": (2, 40), "wsi": (1, 12, 20), "mri": (2, 6, 8, 10), "cnv": (1, 24)}
    c = make_cohort(50, shapes, seed=2, availability={"wsi": 0.5})
    for name, shape in shapes.items():
        assert c.inputs[name].shape == (50, *shape)
    assert c.present.sum(0).tolist() == [50, 25, 50, 50]
    assert 0 <= c.inputs["wsi"].min() and c.inputs["wsi"].max() <= 1
    with pytest.raises(ValueError, match="spatial dims"):
        make_cohort(10, {"rna": (1024,)})


@pytest.mark.skipif(not COHORT_CSV.is_file(), reason=f"real cohort table not found at {COHORT_CSV}")
def test_layout_drawn_from_the_real_cohort_table():
    import pandas as pd

    table = pd.read_csv(COHORT_CSV)
    c = make_cohort(shapes=TINY, cohort_csv=COHORT_CSV, seed=0)
    assert len(c) == len(table) == 1104
    for m, name in enumerate(TINY):
        np.testing.assert_array_equal(c.present[:, m].numpy(), table[f"has_{name}"].to_numpy().astype(bool))
    np.testing.assert_array_equal(c.split, table["split"].to_numpy())
    np.testing.assert_array_equal(c.fold, table["cv_fold"].fillna(-1).to_numpy().astype(int))
    for j, column in enumerate(["radiation", "chemo", "age_years"]):
        np.testing.assert_array_equal(torch.isnan(c.clinical[:, j]).numpy(), table[column].isna().to_numpy())


def test_survival_is_learnable_from_a_modality_beyond_clinical_covariates(cohort):
    """A Cox model on 8 principal components of RNA beats the clinical Cox model on the same patients."""
    import pandas as pd
    from lifelines import CoxPHFitter
    from lifelines.utils import concordance_index

    has_rna = cohort.present[:, 0].numpy()
    train, test = cohort.indices("train"), cohort.indices("test")
    train, test = train[has_rna[train]], test[has_rna[test]]
    pcs = principal_components(cohort.inputs["rna"], train, 8)
    t, e = cohort.time.numpy(), cohort.event.numpy()
    frame = pd.DataFrame(pcs[train]).assign(time=t[train], event=e[train])
    cox = CoxPHFitter(penalizer=0.1).fit(frame, duration_col="time", event_col="event")
    c_rna = concordance_index(t[test], -cox.predict_partial_hazard(pd.DataFrame(pcs[test])).to_numpy(), e[test])
    c_clinical = coxph_clinical(cohort, train, test)["harrell_c"]
    assert c_rna > 0.65, c_rna
    assert c_rna > c_clinical + 0.03, (c_rna, c_clinical)
    assert c_clinical > 0.55, "clinical covariates must carry some signal too"


def test_all_modalities_beat_the_clinical_baseline(cohort):
    """The demo's claim: a Cox model on principal components of every modality (zeros + an indicator
    where missing) and the clinical covariates beats the clinical Cox baseline on the test split."""
    import pandas as pd
    from lifelines import CoxPHFitter

    from pyimputmae.metrics import evaluate
    from pyimputmae.survival import IntervalCuts

    train, test = cohort.indices("train"), cohort.indices("test")
    columns = []
    for m, name in enumerate(cohort.modalities):
        has = cohort.present[:, m].numpy()
        pcs = principal_components(cohort.inputs[name], train[has[train]], 4)
        columns += [np.where(has[:, None], pcs, 0.0), (~has[:, None]).astype(np.float64)]
    clinical, _ = clinical_design_matrix(cohort.clinical.numpy(), train, cohort.clinical_names)
    x = np.concatenate([*columns, clinical], axis=1)
    t, e = cohort.time.numpy().astype(np.float64), cohort.event.numpy().astype(np.float64)
    grid = IntervalCuts.fit(t[train], 20).cuts
    frame = pd.DataFrame(x[train]).assign(time=t[train], event=e[train])
    cox = CoxPHFitter(penalizer=0.1).fit(frame, duration_col="time", event_col="event")
    surv = cox.predict_survival_function(pd.DataFrame(x[test]), times=grid).to_numpy().T
    ours = evaluate(surv, grid, t[test], e[test])
    baseline = coxph_clinical(cohort, train, test)
    assert set(baseline) == {"c_index", "ibs", "cs_score", "harrell_c"}
    assert ours["c_index"] > baseline["c_index"] + 0.05, (ours, baseline)
    assert ours["cs_score"] > baseline["cs_score"], (ours, baseline)


def test_one_modality_is_partly_predictable_from_another(cohort):
    """Least squares from 16 RNA principal components to the whole DNAm vector, fitted on training
    patients with both, explains a clear share of the test variance — but not all of it."""
    both = (cohort.present[:, 0] & cohort.present[:, 1]).numpy()
    train, test = cohort.indices("train"), cohort.indices("test")
    train, test = train[both[train]], test[both[test]]
    design = torch.as_tensor(np.concatenate([principal_components(cohort.inputs["rna"], train, 16),
                                             np.ones((len(cohort), 1))], axis=1))
    target = cohort.inputs["dnam"].flatten(1).double()
    coef = torch.linalg.lstsq(design[train], target[train]).solution
    residual = target[test] - design[test] @ coef
    r2 = 1 - float(residual.pow(2).sum() / (target[test] - target[train].mean(0)).pow(2).sum())
    assert 0.25 < r2 < 0.9, r2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cohort_on_the_gpu():
    c = make_cohort(32, TINY, seed=0, device="cuda")
    assert all(x.is_cuda for x in c.inputs.values()) and c.present.is_cuda and c.time.is_cuda

"""The core steps of an evaluation study through the public API: modalities withheld at test time
(``Cohort.withhold``) never reach a prediction or an imputation, imputation fidelity in the model's
unit (``norm_pix`` included), rows given as masks or numbers, splits and folds by name, and metrics
on subsets without deaths or without recorded survival."""

from __future__ import annotations

import dataclasses
import itertools
import re
import warnings

import numpy as np
import pytest
import torch

from pyimputmae.data.synthetic import make_cohort
from pyimputmae.inference import evaluate_model, impute, predict_survival
from pyimputmae.model import ImputeMAE, ModalityConfig, ModelConfig, SurvivalModel, normalized_inputs
from pyimputmae.reference.masked_mse import patch_target
from pyimputmae.reference.patch_embed import patchify


def tiny(**changes) -> ModelConfig:
    """1-D, 2-D and 3-D modalities at width 16, the synthetic cohort's clinical columns."""
    return ModelConfig(
        modalities=(ModalityConfig("rna", 1, (32,), 8, 1), ModalityConfig("wsi", 3, (8, 8), 4, 1),
                    ModalityConfig("mri", 1, (8, 8, 8), 4, 1)),
        dim=16, heads=2, mlp=32, decoder_depth=1, decoder_dim=16, decoder_heads=2, decoder_mlp=32,
        clinical_features=("radiation", "chemo", "age"), clinical_hidden=8, fusion_heads=2, freeze="none",
        **changes)


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(n_patients=60, shapes={m.name: m.shape for m in tiny().modalities}, seed=5)


def survival_model(cohort, **changes) -> SurvivalModel:
    torch.manual_seed(0)
    cfg = tiny(**changes)
    return SurvivalModel(ImputeMAE(cfg), cfg).fit_preprocessing(cohort).eval()


def scrambled(cohort, name: str, how: str):
    """``cohort`` with the inputs of ``name`` replaced where the patient lacks it (present False)."""
    x = cohort.inputs[name].clone()
    lacks = ~cohort.present[:, cohort.modalities.index(name)]
    fill = {"nan": torch.full_like(x, float("nan")), "inf": torch.full_like(x, float("inf")),
            "large": 1e4 * torch.randn_like(x)}[how]
    x[lacks] = fill[lacks]
    return dataclasses.replace(cohort, inputs={**cohort.inputs, name: x})


# ---------------------------------------------------------------------------- withholding
@pytest.mark.parametrize("missing", ["mask", "impute"])
@pytest.mark.parametrize("how", ["large", "nan", "inf"])
def test_a_withheld_modality_reaches_neither_predictions_nor_imputations(cohort, missing, how):
    """Every subset of modalities withheld: the inputs left behind (the true values, or anything
    else, NaN included) change no prediction and no imputation, in either fine-tuning mode."""
    model = survival_model(cohort, missing=missing)
    test = cohort.indices("test")
    names = cohort.modalities
    for k in range(1, len(names) + 1):
        for withheld in itertools.combinations(names, k):
            held = cohort.withhold(withheld)
            leaky = dataclasses.replace(held, inputs=dict(cohort.inputs))  # the true values left in place
            for name in withheld:
                leaky = scrambled(leaky, name, how)
            expected = predict_survival(model, held, test)
            assert np.isfinite(expected).all()
            np.testing.assert_array_equal(predict_survival(model, leaky, test), expected, err_msg=str(withheld))
            for keep_present in (True, False):
                want, got = impute(model, held, test, keep_present=keep_present), impute(model, leaky, test,
                                                                                          keep_present=keep_present)
                for name in names:
                    np.testing.assert_array_equal(got[name], want[name], err_msg=f"{withheld} -> {name}")


def test_withhold_is_a_cohort_that_never_had_the_modality(cohort):
    test = cohort.indices("test")
    held = cohort.withhold("mri", rows=test)
    j = cohort.modalities.index("mri")
    assert not held.present[test, j].any() and (held.inputs["mri"][test] == 0).all()
    # other patients and modalities are untouched, and so is the cohort itself
    train = cohort.indices("train")
    assert torch.equal(held.present[train], cohort.present[train])
    assert torch.equal(held.inputs["mri"][train], cohort.inputs["mri"][train])
    assert held.inputs["rna"] is cohort.inputs["rna"]
    assert cohort.present[test, j].any() and (cohort.inputs["mri"][test] != 0).any()
    # keep only some modalities by withholding the others; a boolean mask of rows works too
    only_rna = cohort.withhold(set(cohort.modalities) - {"rna"}, rows=cohort.split == "test")
    assert torch.equal(only_rna.present[test], cohort.present[test] & torch.tensor([True, False, False]))
    with pytest.raises(ValueError, match=r"cannot withhold modality 'dnam': the cohort has rna, wsi, mri"):
        cohort.withhold(["rna", "dnam"])


def test_patients_left_without_any_modality_are_predicted_from_clinical_data_and_not_imputed(cohort):
    model = survival_model(cohort)
    test = cohort.indices("test")
    nothing = cohort.withhold(cohort.modalities)
    curves = predict_survival(model, nothing, test)
    assert np.isfinite(curves).all() and np.allclose(curves[:, 0], 1.0)
    assert all(np.isnan(v).all() for v in impute(model, nothing, test).values())


# ----------------------------------------------------------------------- imputation fidelity
@pytest.mark.parametrize("norm_pix", [False, True], ids=["raw", "norm_pix"])
def test_imputation_fidelity_compares_like_with_like(cohort, norm_pix):
    """Observed values come back in the unit the model reconstructs in: with norm_pix normalised
    per patch like the pre-training target (before, raw and normalised values shared one array)."""
    torch.manual_seed(0)
    mae = ImputeMAE(tiny(norm_pix=norm_pix)).eval()
    rows = np.flatnonzero((cohort.present[:, 0] & cohort.present[:, 1:].any(1)).numpy())  # RNA and another
    truth = impute(mae, cohort, rows)["rna"]
    x = cohort.inputs["rna"][rows]
    expected = normalized_inputs(x, 8) if norm_pix else x
    np.testing.assert_allclose(truth, expected.numpy(), rtol=1e-6, atol=1e-6)
    if norm_pix:  # the same unit as masked_mse's target, patch by patch
        torch.testing.assert_close(patchify(torch.as_tensor(truth), 8), patch_target(x, 8, True))
        assert abs(truth.reshape(len(rows), 4, 8).mean(-1)).max() < 1e-5
    recon = impute(mae, cohort.withhold("rna"), rows)["rna"]
    assert recon.shape == truth.shape and np.isfinite(recon).all()
    assert not np.array_equal(recon, truth)  # reconstructed, not copied


# ------------------------------------------------------------------------------ rows, splits
def test_a_boolean_mask_selects_its_rows(cohort):
    """A mask used to be cast to integers: rows 0 and 1, over and over."""
    model = survival_model(cohort)
    mask = cohort.split == "test"
    np.testing.assert_array_equal(predict_survival(model, cohort, mask),
                                  predict_survival(model, cohort, np.flatnonzero(mask)))
    for name, value in impute(model, cohort, torch.as_tensor(mask)).items():
        np.testing.assert_array_equal(value, impute(model, cohort, np.flatnonzero(mask))[name])
    assert evaluate_model(model, cohort, mask) == evaluate_model(model, cohort, np.flatnonzero(mask))


def test_preprocessing_is_fitted_on_the_rows_of_a_boolean_mask(cohort):
    """SurvivalModel.fit_preprocessing read a mask as rows 0 and 1 too."""
    train = cohort.split == "train"
    torch.manual_seed(0)
    by_mask = SurvivalModel(ImputeMAE(tiny()), tiny()).fit_preprocessing(cohort, train)
    by_rows = survival_model(cohort)  # default: cohort.indices("train")
    np.testing.assert_array_equal(by_mask.cuts.numpy(), by_rows.cuts.numpy())
    assert torch.equal(by_mask.clinical.median, by_rows.clinical.median)
    with pytest.raises(ValueError, match=re.escape("idx is a boolean mask of shape (2,), but the cohort has 60")):
        by_mask.fit_preprocessing(cohort, np.array([True, False]))


@pytest.mark.parametrize("idx, words", [
    (np.array([True, False]), "is a boolean mask of shape (2,), but the cohort has 60 patients"),
    (np.array([0.0, 1.0]), "must be integer row numbers or a boolean mask, got dtype float64 (first entry 0.0)"),
    (np.array([3, 60]), "has row 60, outside the cohort's 60 rows (0 to 59)"),
    (np.array([-1]), "has row -1, outside"),
    (np.array([[0, 1]]), "must be one-dimensional, got shape (1, 2)"),
])
def test_bad_rows_are_named(cohort, idx, words):
    model = survival_model(cohort)
    for call in (lambda: predict_survival(model, cohort, idx), lambda: impute(model, cohort, idx),
                 lambda: evaluate_model(model, cohort, idx), lambda: cohort.batch(idx)):
        with pytest.raises(ValueError, match=re.escape(f"idx {words}")):
            call()


def test_splits_and_folds_by_name(cohort):
    assert len(cohort.indices("val")) == 0  # a known split without patients
    with pytest.raises(ValueError, match=r"unknown split 'tset': choose one of train, val, test \(this cohort has "
                                         r"test, train\)"):
        cohort.indices("tset")
    with pytest.raises(ValueError, match=r"fold 7 is not a cross-validation fold of this cohort: its training folds "
                                         r"are 0, 1, 2, 3, 4"):
        cohort.indices("train", 7)
    folds = [cohort.indices("val", f) for f in range(5)]
    assert sorted(np.concatenate(folds).tolist()) == cohort.indices("train").tolist()


# ------------------------------------------------------------------------------------ metrics
def test_evaluating_rows_without_a_death_warns_and_gives_nan(cohort):
    model = survival_model(cohort)
    censored = np.flatnonzero(cohort.event.numpy() == 0)[:10]
    with pytest.warns(RuntimeWarning, match=r"none of the 10 patients evaluated has an event, so the C-index, IBS, "
                                            r"CS-score and Harrell's C are undefined \(NaN\)"):
        metrics = evaluate_model(model, cohort, censored)
    assert all(np.isnan(v) for v in metrics.values())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(evaluate_model(model, cohort, cohort.indices("test"))["c_index"])


def test_evaluating_no_rows_or_rows_without_survival_is_refused(cohort):
    model = survival_model(cohort)
    with pytest.raises(ValueError, match="evaluate_model got no rows to evaluate"):
        evaluate_model(model, cohort, np.array([], dtype=np.int64))
    unknown = dataclasses.replace(cohort, time=cohort.time.clone())
    test = cohort.indices("test")
    unknown.time[test[2]] = float("nan")
    with pytest.raises(ValueError, match=rf"1 of the {len(test)} patients to evaluate have no recorded survival time "
                                         rf"and event 0/1 \({cohort.ids[test[2]]}\)"):
        evaluate_model(model, unknown, test)

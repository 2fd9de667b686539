"""Survival metrics and discrete-time labels against their references: pycox 0.3.0 and lifelines.

pycox is a test-only dependency (its imports pull numba and h5py; it is installed without its
pinned requirements):

    pip install --no-deps pycox==0.3.0 torchtuples==0.2.2 && pip install numba h5py scikit-learn requests

pycox 0.3.0 integrates the Brier score with ``scipy.integrate.simps``, which scipy 1.14 removed;
the ``pycox`` fixture puts ``simpson`` in its place, which is also what our Simpson rule follows.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyimputmae import metrics
from pyimputmae.survival import IntervalCuts, hazards_to_survival, nll_logistic_hazard

TOL = 1e-12


@pytest.fixture(scope="module")
def pycox():
    try:
        import scipy.integrate

        if not hasattr(scipy.integrate, "simps"):
            scipy.integrate.simps = lambda y, x=None, **_: scipy.integrate.simpson(y, x=x)
        import pycox.evaluation
        import pycox.models
        import pycox.models.loss
    except Exception as exc:  # ImportError, or numba failing on this numpy
        pytest.skip(f"pycox 0.3.0 cannot be imported ({type(exc).__name__}: {exc}); install it with "
                    "`pip install --no-deps pycox==0.3.0 torchtuples==0.2.2 && pip install numba h5py "
                    "scikit-learn requests`")
    return pycox


def random_curves(rng: np.random.Generator, n: int, grid: np.ndarray) -> np.ndarray:
    """Non-increasing curves from 1, rounded to 0.1 so that predictions tie often."""
    drops = rng.uniform(0.0, 0.3, size=(n, grid.size - 1))
    surv = np.concatenate([np.ones((n, 1)), np.cumprod(1 - drops, axis=1)], axis=1)
    return np.round(surv, 1)


def model_like_curves(rng: np.random.Generator, n: int, n_bins: int) -> np.ndarray:
    """Logistic-hazard curves with a patient risk shifting every interval's logit."""
    risk = rng.standard_normal((n, 1))
    logits = torch.as_tensor(-2.5 + risk + 0.3 * rng.standard_normal((n, n_bins)))
    return hazards_to_survival(logits).numpy()


def cohort_like(rng: np.random.Generator, n: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """Durations and events: continuous, tied (rounded), or with deaths and censorings at time 0."""
    t = rng.exponential(3.0, size=n)
    if kind == "ties":
        t = np.round(t, 0)
    e = (rng.uniform(size=n) < 0.55).astype(np.float64)
    if kind == "time0":
        t[:6] = 0.0
        e[:6] = [1, 1, 1, 0, 0, 0]
    return t, e


CASES = [(curves, kind) for curves in ("random", "model") for kind in ("continuous", "ties", "time0")]


@pytest.mark.parametrize("steps", ["pre", "post"])
@pytest.mark.parametrize(("curves", "kind"), CASES)
def test_metrics_match_pycox_evalsurv(pycox, curves, kind, steps):
    import pandas as pd

    rng = np.random.default_rng(CASES.index((curves, kind)))
    n, n_bins = 240, 20
    t, e = cohort_like(rng, n, kind)
    # The grid is fitted on "training" times: some evaluated durations lie beyond its last cut.
    grid = IntervalCuts.fit(t[: n // 2], n_bins).cuts
    surv = random_curves(rng, n, grid) if curves == "random" else model_like_curves(rng, n, n_bins)

    ev = pycox.evaluation.EvalSurv(pd.DataFrame(surv.T, index=grid), t, e, censor_surv="km", steps=steps)
    ibs_times = np.linspace(0, t.max(), 50)
    ours = metrics.evaluate(surv, grid, t, e, steps=steps)

    assert abs(ours["c_index"] - ev.concordance_td("antolini")) < TOL
    assert abs(ours["ibs"] - ev.integrated_brier_score(ibs_times)) < TOL
    assert ours["cs_score"] == pytest.approx((ours["c_index"] + 1 - ours["ibs"]) / 2, abs=TOL)
    np.testing.assert_allclose(metrics.brier_scores(surv, grid, t, e, ibs_times, steps),
                               ev.brier_score(ibs_times).to_numpy(), rtol=0, atol=TOL)


def test_kaplan_meier_matches_pycox(pycox):
    rng = np.random.default_rng(3)
    t = np.round(rng.exponential(2.0, 300), 1)
    e = (rng.uniform(size=300) < 0.4).astype(np.float64)
    for durations in (t, np.concatenate([[0.0], t])):
        events = e if durations is t else np.concatenate([[1.0], e])
        expected = pycox.utils.kaplan_meier(durations, events)
        times, surv = metrics.kaplan_meier(durations, events)
        np.testing.assert_array_equal(times, expected.index.to_numpy())
        np.testing.assert_allclose(surv, expected.to_numpy(), rtol=0, atol=TOL)


@pytest.mark.parametrize("n_bins", [19, 20])
def test_interval_cuts_match_pycox_label_transform(pycox, n_bins):
    """Same cuts as LogisticHazard.label_transform(n_bins + 1); our labels are pycox's minus one
    (pycox's output 0 is the hazard at time 0), events at time 0 in our interval 0."""
    rng = np.random.default_rng(4)
    t_train = np.round(rng.exponential(3.0, 500), 2)
    e_train = (rng.uniform(size=500) < 0.5).astype(np.float64)
    t_train[:4], e_train[:4] = 0.0, [1, 0, 1, 0]
    transform = pycox.models.LogisticHazard.label_transform(n_bins + 1)
    transform.fit(t_train, e_train)
    cuts = IntervalCuts.fit(t_train, n_bins)
    np.testing.assert_array_equal(cuts.cuts, transform.cuts)

    # training times, every cut exactly (as a death and as a censoring), and test times beyond the last cut
    t = np.concatenate([t_train, cuts.cuts, cuts.cuts, cuts.cuts[-1] * np.array([1.2, 1.5])])
    e = np.concatenate([e_train, np.ones(n_bins + 1), np.zeros(n_bins + 1), [1.0, 0.0]])
    idx_pycox, ev_pycox = transform.transform(t, e)
    idx, ev = cuts.transform(t, e)
    np.testing.assert_array_equal(ev, ev_pycox)
    expected = np.where(ev_pycox == 1, np.maximum(idx_pycox - 1, 0), idx_pycox - 1)
    np.testing.assert_array_equal(idx, expected)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_nll_matches_pycox(pycox, reduction):
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(64, 20, generator=g, dtype=torch.float64) * 3
    idx = torch.randint(0, 20, (64,), generator=g)
    events = (torch.rand(64, generator=g) < 0.5).double()
    expected = pycox.models.loss.NLLLogistiHazardLoss(reduction)(logits, idx, events)
    torch.testing.assert_close(nll_logistic_hazard(logits, idx, events, reduction), expected, rtol=0, atol=1e-12)


def test_nll_on_our_labels_is_pycox_nll_without_the_time_zero_output(pycox):
    """pycox's loss on its n + 1 outputs = BCE(output 0, survived) + our loss on the other n, for every
    patient past time 0; patients censored before c_1 only ever touch pycox's output 0."""
    rng = np.random.default_rng(6)
    t = np.round(rng.exponential(3.0, 400), 2)
    e = (rng.uniform(size=400) < 0.5).astype(np.float64)
    transform = pycox.models.LogisticHazard.label_transform(21)
    idx_pycox, ev_pycox = transform.fit_transform(t, e)
    idx, ev = IntervalCuts.fit(t, 20).transform(t, e)
    logits = torch.as_tensor(rng.standard_normal((400, 21)) * 2)
    loss_pycox = pycox.models.loss.nll_logistic_hazard(logits, torch.as_tensor(idx_pycox),
                                                       torch.as_tensor(ev_pycox).double(), reduction="none")
    ours = nll_logistic_hazard(logits[:, 1:], torch.as_tensor(idx), torch.as_tensor(ev), reduction="none")
    past_zero = torch.as_tensor(idx_pycox >= 1)
    time_zero_term = torch.nn.functional.softplus(logits[:, 0])  # BCE(output 0, target 0)
    torch.testing.assert_close(ours[past_zero], (loss_pycox - time_zero_term)[past_zero])
    assert torch.all(ours[torch.as_tensor(idx == -1)] == 0)


def test_survival_curves_match_pycox_predict_surv(pycox):
    cuts = np.linspace(0.0, 5.0, 21)
    net = torch.nn.Linear(21, 21, bias=False)
    torch.nn.init.eye_(net.weight)
    model = pycox.models.LogisticHazard(net, duration_index=cuts)
    logits = torch.randn(16, 21) * 2
    logits[:, 0] = -60.0  # pycox's time-0 output set to a zero hazard: the rest is our model
    expected = model.predict_surv_df(logits)
    np.testing.assert_array_equal(expected.index.to_numpy(), cuts)
    # pycox adds 1e-7 inside its log(1 − h); ours is exact
    np.testing.assert_allclose(hazards_to_survival(logits[:, 1:]).numpy(), expected.to_numpy().T, atol=1e-5)


def test_harrell_c_is_lifelines_on_restricted_mean_survival():
    from lifelines.utils import concordance_index

    rng = np.random.default_rng(7)
    grid = np.linspace(0.0, 8.0, 21)
    surv = model_like_curves(rng, 200, 20)
    t, e = cohort_like(rng, 200, "ties")
    rmst = metrics.restricted_mean_survival(surv, grid)
    assert metrics.harrell_c(surv, grid, t, e) == concordance_index(t, rmst, e)
    np.testing.assert_allclose(rmst, surv[:, 1:] @ np.diff(grid))


def test_no_comparable_pair_is_nan_for_both_concordances_not_an_error():
    """One evaluated patient, or deaths only at the last time: no pair is comparable (lifelines
    itself raises ZeroDivisionError), so a tiny split after training is reported, not a crash."""
    grid = np.linspace(0.0, 4.0, 5)
    surv = np.linspace(1.0, 0.2, 5)[None, :].repeat(3, 0)
    for t, e in ((np.array([1.5]), np.array([1.0])), (np.array([1.0, 1.0, 2.0]), np.array([0.0, 0.0, 1.0]))):
        n = len(t)
        assert np.isnan(metrics.concordance_td(surv[:n], grid, t, e))
        assert np.isnan(metrics.harrell_c(surv[:n], grid, t, e))
        out = metrics.evaluate(surv[:n], grid, t, e)
        assert np.isnan(out["c_index"]) and np.isnan(out["harrell_c"])


def test_a_perfect_ranking_scores_one_and_its_reverse_zero():
    t = np.array([0.5, 1.5, 2.5, 3.5, 4.5, 5.5])
    e = np.ones(6)
    grid = np.arange(7.0)
    # patient i's curve drops to 0 at its own death interval: a perfect prediction
    surv = (grid[None, :] < np.ceil(t)[:, None]).astype(np.float64)
    assert metrics.concordance_td(surv, grid, t, e) == 1.0
    assert metrics.harrell_c(surv, grid, t, e) == 1.0
    assert metrics.concordance_td(surv[::-1], grid, t, e) == 0.0


def test_post_steps_count_every_death_before_the_first_cut_as_discordant():
    """Why "pre" is the default: with "post" a death before c_1 reads S(c_0) = 1 for everybody."""
    t = np.array([0.2, 0.4, 0.6, 5.0])
    e = np.array([1.0, 1.0, 1.0, 0.0])
    grid = np.linspace(0.0, 5.0, 6)
    risk = np.array([3.0, 2.0, 1.0, 0.0])  # correctly ordered
    surv = hazards_to_survival(torch.as_tensor(risk[:, None] - 2.0 + np.zeros((4, 5)))).numpy()
    assert metrics.concordance_td(surv, grid, t, e, steps="pre") == 1.0
    assert metrics.concordance_td(surv, grid, t, e, steps="post") == 0.0


def test_simpson_follows_scipy():
    from scipy.integrate import simpson

    rng = np.random.default_rng(8)
    for n in (2, 3, 4, 7, 50, 51):
        x = np.sort(rng.uniform(0, 10, n))
        y = rng.standard_normal(n)
        assert metrics._simpson(y, x) == pytest.approx(simpson(y, x=x), rel=1e-12, abs=1e-12)


def test_inputs_are_checked():
    grid = np.linspace(0, 1, 3)
    with pytest.raises(ValueError, match="len\\(time_grid\\)"):
        metrics.evaluate(np.ones((2, 4)), grid, np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match="events must be 0"):
        metrics.evaluate(np.ones((2, 3)), grid, np.ones(2), np.array([0.0, 2.0]))
    with pytest.raises(ValueError, match="steps"):
        metrics.concordance_td(np.ones((2, 3)), grid, np.ones(2), np.ones(2), steps="mid")

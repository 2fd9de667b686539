"""Discrete-time survival utilities: interval cuts, the logistic-hazard NLL, hazards → curves.

Agreement with pycox itself is in tests/test_metrics.py (it needs pycox installed); these tests
pin the contract down without it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pyimputmae.survival import IntervalCuts, hazards_to_survival, nll_logistic_hazard, survival_at


def naive_nll(logits: torch.Tensor, idx: torch.Tensor, events: torch.Tensor) -> torch.Tensor:
    """Per-row loop over the definition: −Σ_{j<idx} log(1 − h_j) − [e·log h_idx + (1 − e)·log(1 − h_idx)]."""
    out = []
    for row, k, e in zip(logits.double(), idx.tolist(), events.double()):
        h = torch.sigmoid(row)
        loss = -torch.log1p(-h[:k]).sum() if k > 0 else torch.zeros((), dtype=torch.float64)
        if k >= 0:
            loss = loss - (e * torch.log(h[k]) + (1 - e) * torch.log1p(-h[k]))
        out.append(loss)
    return torch.stack(out)


def test_cuts_are_equidistant_from_zero_to_the_largest_training_time():
    times = np.array([0.3, 2.0, 7.5, 1.1])
    cuts = IntervalCuts.fit(times, n_bins=5)
    np.testing.assert_array_equal(cuts.cuts, np.linspace(0.0, 7.5, 6))
    assert cuts.n_bins == 5 and cuts.cuts.dtype == np.float64


def test_transform_follows_pycox_discretisation_shifted_by_one():
    cuts = IntervalCuts([0.0, 1.0, 2.0, 3.0, 4.0])
    time = np.array([0.0, 0.5, 1.0, 1.5, 4.0, 0.0, 0.5, 1.0, 1.5, 4.0, 9.0, 9.0])
    event = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 1, 0])
    idx, ev = cuts.transform(time, event)
    # events: the interval (c_j, c_j+1] that holds them, time 0 in interval 0;
    # censorings: survived every interval that ends at or before the time (−1 = none);
    # beyond the last cut: censored at the last cut.
    np.testing.assert_array_equal(idx, [0, 0, 0, 1, 3, -1, -1, 0, 0, 3, 3, 3])
    np.testing.assert_array_equal(ev, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0])
    assert idx.dtype == np.int64 and ev.dtype == np.float32


def test_transform_keeps_torch_inputs_torch():
    cuts = IntervalCuts.fit(np.array([1.0, 4.0]), n_bins=4)
    idx, ev = cuts.transform(torch.tensor([0.5, 2.5, 3.0]), torch.tensor([1.0, 0.0, 1.0]))
    assert isinstance(idx, torch.Tensor) and idx.dtype == torch.int64 and ev.dtype == torch.float32
    assert idx.tolist() == [0, 1, 2] and ev.tolist() == [1.0, 0.0, 1.0]


def test_transform_rejects_negative_times():
    with pytest.raises(ValueError, match="non-negative"):
        IntervalCuts.fit(np.array([1.0, 2.0])).transform(np.array([-1.0]), np.array([1]))


def test_cuts_round_trip_through_json():
    cuts = IntervalCuts.fit(np.random.default_rng(0).exponential(3.0, 100), n_bins=20)
    again = IntervalCuts.from_dict(json.loads(json.dumps(cuts.to_dict())))
    np.testing.assert_array_equal(again.cuts, cuts.cuts)
    assert again.n_bins == 20


def test_nll_matches_its_definition_row_by_row():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(32, 10, generator=g, dtype=torch.float64) * 3
    idx = torch.randint(-1, 10, (32,), generator=g)
    events = (torch.rand(32, generator=g) < 0.5).double()
    events[idx < 0] = 0  # −1 only ever comes from a censoring
    expected = naive_nll(logits, idx, events)
    torch.testing.assert_close(nll_logistic_hazard(logits, idx, events, reduction="none"), expected)
    torch.testing.assert_close(nll_logistic_hazard(logits, idx, events), expected.mean())
    torch.testing.assert_close(nll_logistic_hazard(logits, idx, events, reduction="sum"), expected.sum())


def test_nll_of_a_patient_censored_before_the_first_cut_is_zero():
    logits = torch.randn(2, 5, requires_grad=True)
    loss = nll_logistic_hazard(logits, torch.tensor([-1, -1]), torch.tensor([0.0, 0.0]), reduction="none")
    assert loss.tolist() == [0.0, 0.0]
    loss.sum().backward()
    assert torch.all(logits.grad == 0)


def test_nll_is_finite_for_extreme_logits():
    logits = torch.tensor([[100.0, -100.0, 100.0], [-100.0, 100.0, -100.0]], requires_grad=True)
    loss = nll_logistic_hazard(logits, torch.tensor([2, 1]), torch.tensor([1.0, 0.0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert loss.item() == pytest.approx(100.0, rel=1e-6)  # row 0: log1p(e^100) ≈ 100; row 1: ≈ 100


def test_nll_computes_bf16_logits_in_fp32():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(16, 20, generator=g) * 2).bfloat16().requires_grad_()
    idx = torch.randint(0, 20, (16,), generator=g)
    events = (torch.rand(16, generator=g) < 0.5).float()
    loss = nll_logistic_hazard(logits, idx, events)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, nll_logistic_hazard(logits.detach().float(), idx, events))
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16 and torch.isfinite(logits.grad.float()).all()


def test_nll_rejects_an_index_beyond_the_logits():
    with pytest.raises(ValueError, match=r"\[-1, 4\)"):
        nll_logistic_hazard(torch.zeros(1, 4), torch.tensor([4]), torch.tensor([1.0]))


def test_survival_starts_at_one_and_multiplies_interval_survivals():
    logits = torch.randn(8, 6, dtype=torch.float64) * 2
    surv = hazards_to_survival(logits)
    assert surv.shape == (8, 7)
    assert torch.all(surv[:, 0] == 1) and torch.all(surv[:, 1:] <= surv[:, :-1])
    expected = torch.cumprod(1 - torch.sigmoid(logits), dim=1)
    torch.testing.assert_close(surv[:, 1:], expected)


def test_survival_of_bf16_logits_is_fp32_and_never_nan():
    logits = torch.tensor([[-80.0, 0.0, 80.0, 80.0]]).bfloat16()
    surv = hazards_to_survival(logits)
    assert surv.dtype == torch.float32 and torch.isfinite(surv).all()
    assert surv[0, -1] < 1e-30


def test_survival_at_reads_the_step_at_or_before_each_time():
    cuts = np.array([0.0, 1.0, 2.0, 3.0])
    surv = np.array([[1.0, 0.9, 0.7, 0.4]])
    times = np.array([-1.0, 0.0, 0.5, 1.0, 2.99, 3.0, 10.0])
    expected = [[1.0, 1.0, 1.0, 0.9, 0.7, 0.4, 0.4]]
    np.testing.assert_array_equal(survival_at(surv, cuts, times), expected)
    got = survival_at(torch.tensor(surv), cuts, torch.tensor(times))
    assert isinstance(got, torch.Tensor)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_training_labels_and_curves_agree_on_the_grid():
    """A patient who dies in interval j has survived j intervals: the model's curve at the cut before
    its death is the product of exactly the (1 − h) terms its loss rewards."""
    cuts = IntervalCuts.fit(np.array([10.0]), n_bins=10)
    logits = torch.randn(1, 10, dtype=torch.float64)
    idx, ev = cuts.transform(np.array([4.5]), np.array([1.0]))
    assert idx[0] == 4
    surv = hazards_to_survival(logits)
    nll = nll_logistic_hazard(logits, torch.as_tensor(idx), torch.as_tensor(ev), reduction="none")
    h = torch.sigmoid(logits[0, 4])
    torch.testing.assert_close(nll[0], -torch.log(surv[0, 4]) - torch.log(h))

"""The whole user path on each device: train() → checkpoint → resume → save → load → predict, impute
and evaluate. On CPU this runs in every test run; on a GPU machine (tools/gpu_check.sh, stage
``train``) it runs once more on CUDA, where the code paths that only a GPU takes live: the cohort
kept on the device (``data_on_device``) or copied to it batch by batch, bf16 autocast, CUDA
RNG state in checkpoints, and models moved between the GPU and the CPU.

The GPU machines have torch, numpy, pandas and matplotlib but not lifelines: there Harrell's C (the
one metric that uses lifelines) is left out, as NaN, the other metrics are checked, and the
Kaplan-Meier figure (drawn with lifelines) is not looked for.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from op_testing import TINY_MODEL

from pyimputmae import metrics, training
from pyimputmae._graph_step import GraphedStep
from pyimputmae.data.synthetic import make_cohort
from pyimputmae.inference import evaluate_model, impute, load, predict_survival
from pyimputmae.model.config import ModelConfig
from pyimputmae.model.mae import ImputeMAE, new_rng
from pyimputmae.training import train

TINY = ModelConfig.small(**TINY_MODEL)
FAST = {"pretrain_epochs": 2, "finetune_epochs": 2, "pretrain_batch_size": 32, "finetune_batch_size": 32,
        "progress": False, "log_every": 1, "checkpoint_every": 2}


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(n_patients=96, shapes={m.name: m.shape for m in TINY.modalities}, seed=5)


@pytest.fixture
def no_lifelines_needed(monkeypatch):
    """Harrell's C as NaN where lifelines is not installed (the GPU machines); True when it is."""
    try:
        import lifelines  # noqa: F401
    except ImportError:
        monkeypatch.setattr(metrics, "harrell_c", lambda *args, **kwargs: float("nan"))
        return False
    return True


def _checked_metrics(values: dict, with_harrell: bool) -> None:
    assert set(values) == {"c_index", "ibs", "cs_score", "harrell_c"}
    for name, value in values.items():
        if name != "harrell_c" or with_harrell:
            assert np.isfinite(value), (name, value)
    assert 0.0 <= values["c_index"] <= 1.0 and 0.0 <= values["ibs"] <= 1.0


def _placements(device: torch.device) -> list[str]:
    """data_on_device settings whose code differs on ``device``: on a GPU the cohort either moves to
    it whole ("yes") or each batch is copied to it from host memory ("no")."""
    return ["yes", "no"] if device.type == "cuda" else ["auto"]


def test_train_resume_load_predict_impute_and_evaluate_on_the_device(device, tmp_path, cohort, no_lifelines_needed):
    test_idx = cohort.indices("test")
    for placement in _placements(device):
        out = tmp_path / placement
        res = train(cohort=cohort, model=TINY, out_dir=str(out), device=str(device), data_on_device=placement, **FAST)
        assert {p.device.type for p in res.model.parameters()} == {device.type}
        for split in ("train", "test"):
            _checked_metrics(res.metrics[split], no_lifelines_needed)
        assert all(np.isfinite(r["loss"]) and r["patients_per_s"] > 0 for r in res.history)
        assert json.loads((out / "config.json").read_text())["train"]["device"] == str(device)
        # the Kaplan-Meier figure of risk groups draws with lifelines (without it: a warning, no figure)
        for key in ("training_curves", "risk_groups") if no_lifelines_needed else ("training_curves",):
            assert (out / f"{key}.png").read_bytes()[:4] == b"\x89PNG", key

        # the model file loads on the CPU whatever device wrote it, and predicts what the trained
        # model predicts: exactly on the CPU; on a GPU to float32 rounding of other kernels
        loaded = load(res.paths["model"])
        assert {p.device.type for p in loaded.parameters()} == {"cpu"}
        on_cpu = predict_survival(loaded, cohort, test_idx)
        on_device = predict_survival(res.model, cohort, test_idx)
        assert on_cpu.shape == (len(test_idx), len(loaded.cuts)) and np.isfinite(on_device).all()
        np.testing.assert_allclose(on_device, on_cpu, rtol=0, atol=2e-3 if device.type == "cuda" else 0)
        _checked_metrics(evaluate_model(res.model, cohort, test_idx), no_lifelines_needed)
        if device.type == "cuda":  # and back onto the GPU
            back = load(res.paths["model"], device=device)
            np.testing.assert_allclose(predict_survival(back, cohort, test_idx), on_device, rtol=0, atol=1e-5)

        imputed = impute(res.model, cohort, test_idx[:5])
        cpu_imputed = impute(loaded, cohort, test_idx[:5])
        for name, array in imputed.items():
            assert array.shape == (5, *cohort.inputs[name].shape[1:]) and array.dtype == np.float32
            np.testing.assert_allclose(array, cpu_imputed[name], rtol=0, atol=2e-3 if device.type == "cuda" else 0)

        # a checkpoint written on the device resumes there, with more fine-tuning epochs
        more = train(cohort=cohort, model=TINY, out_dir=str(out), device=str(device), data_on_device=placement,
                     resume=True, **{**FAST, "finetune_epochs": 3})
        finetune_epochs = {r["epoch"] for r in more.history if r["stage"] == "finetune"}
        assert max(finetune_epochs) == 2  # epochs counted from 0: the resumed run trained the third one
        _checked_metrics(more.metrics["test"], no_lifelines_needed)


def test_pretraining_captured_in_a_cuda_graph_trains_as_step_by_step(device, tmp_path, cohort, monkeypatch,
                                                                     no_lifelines_needed):
    """cuda_graph=True: the same losses, pre-training and the fine-tuning after it, as without the
    graph (bf16 autocast on the GPU: the padded last batch's other kernel tilings round
    differently), and a resumed run captures again from the loaded optimizer state. GPU only: on
    the CPU, tests/test_graph_step.py checks everything but the capture."""
    if device.type != "cuda":
        pytest.skip("on the CPU: tests/test_graph_step.py (the step without a graph, in detail)")
    run = {**FAST, "device": str(device)}
    plain = train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "plain"), **run)
    graphed = train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "graph"), cuda_graph=True, **run)
    rtol = 2e-2
    for stage in ("pretrain", "finetune"):
        losses = [[r["loss"] for r in res.history if r["stage"] == stage] for res in (plain, graphed)]
        assert np.isfinite(losses[1]).all(), stage
        np.testing.assert_allclose(losses[1], losses[0], rtol=rtol, err_msg=stage)
    _checked_metrics(graphed.metrics["test"], no_lifelines_needed)

    run = {**run, "finetune": False}
    train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "resumed"), cuda_graph=True, **run)
    more = train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "resumed"), cuda_graph=True, resume=True,
                 **{**run, "pretrain_epochs": 3})
    assert max(r["epoch"] for r in more.history) == 2 and np.isfinite([r["loss"] for r in more.history]).all()
    assert {p.device.type for p in more.model.parameters()} == {device.type}


def test_each_replay_of_the_captured_step_trains(device, cohort):
    """The captured step applied batch after batch: the weights move at every call (a graph captured
    on another device or stream records nothing and every replay would do nothing; that is an
    error now), the RNG advances, and the loss reported is each batch's."""
    torch.manual_seed(0)
    model = ImputeMAE(TINY).to(device)
    params = list(model.parameters())
    opt = training.make_optimizer(params, 1e-2, 1e-2, device, graph=True)
    rng = new_rng(0, device)
    amp = torch.bfloat16 if device.type == "cuda" else None
    step = GraphedStep(opt, params, lambda b: training._pretrain_step(model, b, rng), rng, amp, 1.0, 16,
                       device)
    losses, offsets = [], []
    before = [p.detach().clone() for p in params]
    on_device = cohort.to(device)
    # the first call captures; rows gathered on the device straight into the graph's inputs, rows
    # gathered on the host and copied into them (train()'s two cases), a batch copied in; a short last
    for rows, run in ((np.arange(16), lambda r: step.step_rows(on_device, r)),
                      (np.arange(16, 32), lambda r: step.step_rows(cohort, r)),
                      (np.arange(32, 42), lambda r: step(cohort.batch(r).to(device)))):
        loss, _ = run(rows)
        losses.append(loss.item())
        offsets.append(int(rng[1]))
        moved = max((p.detach() - q).abs().max().item() for p, q in zip(params, before))
        assert moved > 1e-4, (len(losses), moved)
        before = [p.detach().clone() for p in params]
    assert np.isfinite(losses).all() and len(set(losses)) == 3
    assert offsets == sorted(offsets) and len(set(offsets)) == 3
    step.release()
    assert all(p.grad is None for p in params)

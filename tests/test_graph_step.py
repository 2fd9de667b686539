"""cuda_graph=True: pre-training's whole step captured in one CUDA graph (pyimputmae/_graph_step.py).

The capture itself needs a GPU (tests/test_device_train.py runs it there, tools/gpu_check.sh stage
``train``). Everything around it is checked here on the CPU, by running the same step without a
graph (``training.GRAPH_STEP_WITHOUT_CUDA``): the static buffers and the padding of a short last
batch, the optimizer state created before the capture, the learning rate read from device tensors,
checkpoints and resumes across the two ways of stepping.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from op_testing import TINY_MODEL

from pyimputmae import training
from pyimputmae._graph_step import GraphedStep, init_optimizer_state
from pyimputmae.data.synthetic import make_cohort
from pyimputmae.model.config import ModelConfig
from pyimputmae.model.mae import ImputeMAE, new_rng
from pyimputmae.training import TrainConfig, train

TINY = ModelConfig.small(**TINY_MODEL)
#: 96 patients: the training split is not a multiple of the batch, so every epoch ends with a short batch
FAST = {"pretrain_epochs": 2, "finetune_epochs": 1, "pretrain_batch_size": 32, "finetune_batch_size": 32,
        "progress": False, "log_every": 1, "device": "cpu"}


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(n_patients=96, shapes={m.name: m.shape for m in TINY.modalities}, seed=7)


@pytest.fixture
def emulated(monkeypatch):
    monkeypatch.setattr(training, "GRAPH_STEP_WITHOUT_CUDA", True)


def _pretrain_losses(res) -> list[float]:
    return [r["loss"] for r in res.history if r["stage"] == "pretrain"]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> None:
    """Every weight within ``atol``, but the attention's key biases: their gradient is 0 in exact
    arithmetic (softmax ignores a shift shared by every key), so AdamW's normalised steps turn the
    rounding noise there into moves of up to the learning rate, which say nothing of the step."""
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    worst = max((sa[k].float() - sb[k].float()).abs().max().item()
                for k in sa if torch.is_tensor(sa[k]) and sa[k].numel() and not k.endswith("qkv.bias"))
    assert worst <= atol, worst


def test_optimizer_state_made_before_the_capture_is_a_fresh_optimizers():
    """The step at learning rate 0 that creates AdamW's state changes no parameter, and the next
    step equals a fresh optimizer's first step bit for bit (moments and step count as if new)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    twin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5))
    twin.load_state_dict(model.state_dict())

    def adamw(m):
        groups = [{"params": [p for p in m.parameters() if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in m.parameters() if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), fused=True)

    opt, fresh = adamw(model), adamw(twin)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert init_optimizer_state(opt, list(model.parameters()))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert not init_optimizer_state(opt, list(model.parameters()))  # state there: left alone
    # a parameter whose state a checkpoint brought back keeps it; only the others get theirs made
    other = torch.nn.Linear(3, 2)
    part = torch.optim.AdamW(other.parameters(), lr=1e-2, fused=True)
    other.weight.grad = torch.ones_like(other.weight)
    part.step()  # the weight has state (step 1, moments ≠ 0), the bias none
    kept = {k: v.clone() for k, v in part.state[other.weight].items()}
    bias = other.bias.detach().clone()
    assert init_optimizer_state(part, list(other.parameters()))
    assert all(torch.equal(part.state[other.weight][k], v) for k, v in kept.items())
    assert part.state[other.bias]["step"].item() == 0 and torch.equal(other.bias, bias)
    assert other.weight.grad is not None and other.bias.grad is None  # gradients as they were

    x = torch.randn(8, 6)
    for m, o in ((model, opt), (twin, fresh)):
        m(x).square().mean().backward()
        o.step()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))
    for p, q in zip(model.parameters(), twin.parameters()):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[p][key], fresh.state[q][key]), key


def test_a_short_batch_padded_to_the_static_rows_gives_the_step_of_the_batch_alone(cohort):
    """Rows without any modality add nothing to the loss or the gradients: the 10-row batch in
    16-row buffers steps the model as the 10 rows would on their own."""
    torch.manual_seed(1)
    a, b = ImputeMAE(TINY), ImputeMAE(TINY)
    b.load_state_dict(a.state_dict())
    batch = cohort.batch(np.arange(10))
    outs = []
    for model, rows in ((a, 16), (b, 10)):
        params = list(model.parameters())
        opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
        rng = new_rng(3, torch.device("cpu"))
        step = GraphedStep(opt, params, lambda bt, m=model, r=rng: m.forward_pretrain(bt, r, check=False),
                           rng, None, 1.0, rows, torch.device("cpu"))
        loss, parts = step(batch)
        outs.append((loss.item(), {k: v.item() for k, v in parts.items()}, rng.clone()))
        assert step.static.present.shape[0] == rows and not step.static.present[10:].any()
    assert outs[0][0] == pytest.approx(outs[1][0], rel=1e-6)
    assert outs[0][1] == pytest.approx(outs[1][1], rel=1e-6)
    assert torch.equal(outs[0][2], outs[1][2])  # the RNG advanced once in each
    _assert_same_weights(a, b, atol=1e-6)


def test_rows_gathered_straight_into_the_static_buffers_give_the_step_of_the_copied_batch(cohort):
    """step_rows (what train() calls) writes a cohort's rows into the step's buffers themselves — the
    forward reads them, and a short batch's padding is redone after a full one — with the same steps
    as copying a gathered batch in."""
    torch.manual_seed(2)
    a, b = ImputeMAE(TINY), ImputeMAE(TINY)
    b.load_state_dict(a.state_dict())
    steps, seen = [], []
    for model in (a, b):
        params = list(model.parameters())
        rng = new_rng(5, torch.device("cpu"))

        def forward(bt, m=model, r=rng):
            seen.append(bt)
            return m.forward_pretrain(bt, r, check=False)

        steps.append(GraphedStep(torch.optim.AdamW(params, lr=1e-3, fused=True), params, forward, rng, None, 1.0,
                                 16, torch.device("cpu")))
    for rows in (np.arange(16), np.arange(16, 26), np.arange(30, 46), np.arange(50, 53)):
        la, pa = steps[0].step_rows(cohort, rows)
        lb, pb = steps[1](cohort.batch(rows))
        assert la.item() == lb.item() and {k: v.item() for k, v in pa.items()} == {k: v.item() for k, v in pb.items()}
        assert seen[-2] is steps[0].static and seen[-1] is steps[1].static
        buf = steps[0].static
        assert all(torch.equal(buf.inputs[k][:len(rows)], cohort.inputs[k][rows]) for k in cohort.modalities)
        assert not buf.present[len(rows):].any() and not buf.inputs["rna"][len(rows):].any()
    _assert_same_weights(a, b, atol=0)
    with pytest.raises(ValueError, match="a batch of 17 rows does not fit the captured step's 16"):
        steps[0].step_rows(cohort, np.arange(17))


def test_cohort_rows_written_into_given_buffers_equal_a_gathered_batch(cohort):
    rows = np.array([5, 1, 70, 33])
    want = cohort.batch(rows)
    out = cohort.batch(np.arange(8))  # buffers of 8 rows: the first 4 are overwritten
    ptrs = {k: v.data_ptr() for k, v in out.inputs.items()}
    got = cohort.batch(rows, out=out)
    for k in cohort.modalities:
        assert torch.equal(got.inputs[k], want.inputs[k]) and got.inputs[k].data_ptr() == ptrs[k]
        assert torch.equal(out.inputs[k][4:], cohort.inputs[k][4:8])  # the rows past them are left alone
    for name in ("present", "time", "event"):
        assert torch.equal(getattr(got, name), getattr(want, name))
    assert torch.equal(got.clinical.nan_to_num(-9), want.clinical.nan_to_num(-9))  # (NaN: unknown values)
    assert got.ids == want.ids
    # buffers a gather cannot write into (here not contiguous) are filled by a copy
    strided = torch.zeros(8, 2, *cohort.inputs["rna"].shape[1:])[:, 0]
    out.inputs["rna"] = strided
    assert torch.equal(cohort.batch(rows, out=out).inputs["rna"], want.inputs["rna"])
    assert torch.equal(strided[:4], want.inputs["rna"])
    out.inputs["rna"] = torch.zeros(3, *cohort.inputs["rna"].shape[1:])
    with pytest.raises(ValueError, match=r"out's inputs\['rna'\] is \(3, .*it must hold 4 rows of the cohort's"):
        cohort.batch(rows, out=out)
    out.inputs["rna"] = torch.zeros(8, *cohort.inputs["rna"].shape[1:], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"torch.float64: it must hold 4 rows .* torch.float32"):
        cohort.batch(rows, out=out)


def test_training_with_the_graph_step_matches_step_by_step_training(tmp_path, cohort, emulated):
    """Same losses in both stages, same weights (up to the float rounding of the padded last batches
    and of the fused optimizer), the learning-rate schedule applied through the device tensors. The
    fine-tuning that follows starts without gradients: the graph's last ones, left on the
    parameters, were once added to fine-tuning's first."""
    plain = train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "plain"), **FAST)
    graphed = train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "graph"), cuda_graph=True, **FAST)
    np.testing.assert_allclose(_pretrain_losses(graphed), _pretrain_losses(plain), rtol=1e-4)
    tuned = [[r["loss"] for r in res.history if r["stage"] == "finetune"] for res in (plain, graphed)]
    np.testing.assert_allclose(tuned[1], tuned[0], rtol=1e-5)
    lrs = [[r["lr"] for r in res.history] for res in (plain, graphed)]
    assert lrs[0] == lrs[1] and len(set(lrs[0])) > 2  # a schedule that moved, the same in both
    _assert_same_weights(graphed.model, plain.model, atol=1e-4)


def test_a_run_resumes_across_the_two_ways_of_stepping(tmp_path, cohort, emulated):
    """A checkpoint of a step-by-step run resumed with cuda_graph=True (its optimizer state taken
    into the fused, capturable optimizer the graph needs), and the other way round, continue the
    run as one that never stopped."""
    run = {**FAST, "finetune": False, "pretrain_epochs": 1}
    whole = train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "whole"), **{**run, "pretrain_epochs": 2})
    for first, then in ((False, True), (True, False)):
        out = str(tmp_path / f"from_{first}")
        half = train(cohort=cohort, model=TINY, out_dir=out, cuda_graph=first, **run)
        # the graph's gradients do not outlive its stage (pre-training only here: fine-tuning's own
        # zero_grad would hide them)
        assert all(p.grad is None for p in half.model.parameters())
        resumed = train(cohort=cohort, model=TINY, out_dir=out, cuda_graph=then, resume=True,
                        **{**run, "pretrain_epochs": 2})
        assert max(r["epoch"] for r in resumed.history) == 1  # the second epoch ran in the other way
        np.testing.assert_allclose(_pretrain_losses(resumed), _pretrain_losses(whole), rtol=1e-4)
        # (pre-training's learning rate is 1e-3: one step of a weight whose gradient's sign flips on
        # rounding moves it by ~2e-3; the runs differ by far less)
        _assert_same_weights(resumed.model, whole.model, atol=2e-4)


def test_settings_the_graph_cannot_capture_are_refused_or_said_to_do_nothing(tmp_path, cohort, monkeypatch):
    with pytest.raises(ValueError, match=r"cuda_graph=True cannot capture fp16 training.*amp='bf16'"):
        TrainConfig(cuda_graph=True, amp="fp16")
    with pytest.raises(ValueError, match=r"grad_accum must be 1, got 4: raise pretrain_batch_size"):
        TrainConfig(cuda_graph=True, grad_accum=4)
    quick = {**FAST, "pretrain_epochs": 1, "finetune": False}
    with pytest.warns(RuntimeWarning, match=r"cuda_graph=True has no effect on cpu: CUDA graphs need a CUDA GPU"):
        res = train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "cpu"), cuda_graph=True, **quick)
    assert np.isfinite(_pretrain_losses(res)).all()
    # amp="auto" on a GPU without native bf16 means fp16: refused before anything is written
    monkeypatch.setattr(training, "GRAPH_STEP_WITHOUT_CUDA", True)
    monkeypatch.setattr(training, "amp_dtype", lambda amp, device: torch.float16)
    with pytest.raises(ValueError, match=r"cuda_graph=True cannot capture fp16 training \(amp='auto' on cpu, whose "
                                         r"GPU has no native bf16\).*Set amp='off' \(float32\) or cuda_graph=False"):
        train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "fp16"), cuda_graph=True, **quick)
    assert not (tmp_path / "fp16").exists()


def test_a_stop_during_graph_pretraining_releases_the_graphs_gradients(tmp_path, cohort, emulated, monkeypatch):
    """SIGTERM while the graph pre-trains: train() stops at the batch with a checkpoint, and the
    gradients the graph left on the parameters are released on the way out (as at a stage's end)."""
    import signal

    released = []
    release = GraphedStep.release
    monkeypatch.setattr(GraphedStep, "release", lambda self: (released.append(True), release(self))[1])
    batches = training._Trainer._batches

    def signal_during_a_batch(self, stage, idx, bs, pos):
        for epoch, b, rows in batches(self, stage, idx, bs, pos):
            if (stage, epoch, b) == ("pretrain", 1, 1):
                signal.raise_signal(signal.SIGTERM)
            yield epoch, b, rows

    monkeypatch.setattr(training._Trainer, "_batches", signal_during_a_batch)
    with pytest.raises(training.TrainingInterrupted, match="stopped by SIGTERM at pretrain epoch 1 batch 2"):
        train(cohort=cohort, model=TINY, out_dir=str(tmp_path), cuda_graph=True, **FAST)
    assert released == [True]

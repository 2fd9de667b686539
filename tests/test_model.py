"""The impuTMAE model on CPU with tiny configurations: pre-training, imputation, fine-tuning, config.

Every test builds its own few-patient batch inline; the whole file runs in well under a minute.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
from pathlib import Path

import pytest
import torch
from op_testing import tool_module

from pyimputmae.data import Batch
from pyimputmae.model import (
    ImputeMAE,
    ModalityConfig,
    ModelConfig,
    SurvivalModel,
    advance_rng_,
    count_parameters,
    new_rng,
)

ROOT = Path(__file__).resolve().parents[1]
CLINICAL = ("radiation", "chemo", "age")


def tiny_config(**changes) -> ModelConfig:
    """1-D, 2-D and 3-D modalities, width 16: a few milliseconds per step."""
    base = ModelConfig(
        modalities=(
            ModalityConfig("rna", 1, (32,), 8, 2),  # 4 tokens, 2 visible
            ModalityConfig("wsi", 3, (8, 8), 4, 1),  # 4 tokens, 2 visible
            ModalityConfig("mri", 1, (8, 8, 8), 4, 1),  # 8 tokens, 4 visible
        ),
        dim=16, heads=2, mlp=32, decoder_depth=1, decoder_dim=16, decoder_heads=2, decoder_mlp=32,
        clinical_features=CLINICAL, clinical_hidden=8, fusion_heads=2,
    )
    return base.replace(**changes) if changes else base


def make_batch(cfg: ModelConfig, present: torch.Tensor | None = None, B: int = 6, seed: int = 0) -> Batch:
    """Random inputs (zeros where missing), clinical values with some NaN."""
    g = torch.Generator().manual_seed(seed)
    M = len(cfg.modalities)
    if present is None:
        present = torch.rand(B, M, generator=g) > 0.4
        present[torch.arange(B), torch.arange(B) % M] = True  # every row has something
    B = present.shape[0]
    inputs = {}
    for i, m in enumerate(cfg.modalities):
        x = torch.randn(B, *m.shape, generator=g)
        inputs[m.name] = x * present[:, i].view(-1, *([1] * len(m.shape)))
    clinical = torch.stack([torch.randint(0, 2, (B,), generator=g).float(),
                            torch.randint(0, 2, (B,), generator=g).float(),
                            40 + 15 * torch.randn(B, generator=g)], 1)
    clinical[0, 1] = float("nan")
    return Batch(inputs=inputs, present=present.clone(), clinical=clinical,
                 time=torch.rand(B, generator=g) * 5 + 0.1, event=(torch.arange(B) % 2).float(),
                 modalities=cfg.names)


def fitted_survival_model(cfg: ModelConfig, mae: ImputeMAE | None = None) -> SurvivalModel:
    model = SurvivalModel(mae or ImputeMAE(cfg), cfg)
    model.clinical.fit(make_batch(cfg, B=16, seed=1).clinical)
    return model


# ------------------------------------------------------------------------- pre-training
def test_pretrain_loss_finite_and_decreasing():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ImputeMAE(cfg)
    batch = make_batch(cfg)
    rng = new_rng(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, per = model.forward_pretrain(batch, rng)
        assert torch.isfinite(loss) and set(per) == set(cfg.names)
        loss.backward()
        opt.step()
        opt.zero_grad()
        advance_rng_(rng)
        losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3])
    assert rng[1].item() == 12


def test_missing_modality_is_excluded_from_loss_and_fully_masked():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ImputeMAE(cfg)
    with torch.no_grad():
        model.mask_token.copy_(torch.randn(cfg.decoder_dim))
    present = torch.ones(4, 3, dtype=torch.bool)
    present[1, 2] = False  # patient 1 has no MRI
    batch = make_batch(cfg, present)
    seen = {}
    hook = model.decoder.register_forward_pre_hook(lambda mod, args: seen.update(x=args[0].detach().clone()))
    loss_a, _ = model.forward_pretrain(batch, new_rng(3))
    batch.inputs["mri"][1] = torch.randn_like(batch.inputs["mri"][1]) * 100
    loss_b, _ = model.forward_pretrain(batch, new_rng(3))
    hook.remove()
    assert torch.equal(loss_a, loss_b)
    pos = model.decoder_pos + model.modality_embed[model.token_modality]
    o, L = model.offsets[2], model.lengths[2]
    fill = (seen["x"] - pos)[1, o:o + L]
    torch.testing.assert_close(fill, model.mask_token.detach().expand(L, -1))


def test_modality_missing_in_every_row_gives_zero_loss():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ImputeMAE(cfg)
    present = torch.ones(5, 3, dtype=torch.bool)
    present[:, 0] = False  # nobody has RNA
    loss, per = model.forward_pretrain(make_batch(cfg, present), new_rng(1))
    assert per["rna"].item() == 0.0 and torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert model.heads["rna"].weight.grad.abs().sum() == 0
    # a configured modality the batch does not carry at all counts as missing everywhere
    batch = make_batch(cfg)
    del batch.inputs["wsi"]
    _, per = model.forward_pretrain(batch, new_rng(1))
    assert per["wsi"].item() == 0.0 and torch.isfinite(per["mri"])


def test_present_columns_follow_batch_modality_order():
    torch.manual_seed(0)
    cfg = tiny_config()
    model = ImputeMAE(cfg)
    batch = make_batch(cfg)
    loss, _ = model.forward_pretrain(batch, new_rng(5))
    order = (2, 0, 1)
    shuffled = Batch(inputs={cfg.names[i]: batch.inputs[cfg.names[i]] for i in order},
                     present=batch.present[:, list(order)], clinical=batch.clinical, time=batch.time,
                     event=batch.event, modalities=tuple(cfg.names[i] for i in order))
    loss2, _ = model.forward_pretrain(shuffled, new_rng(5))
    assert torch.equal(loss, loss2)


@pytest.mark.slow
def test_pretrain_forward_compiles_fullgraph():
    torch.manual_seed(0)
    cfg = tiny_config(modalities=(ModalityConfig("rna", 1, (32,), 8, 1), ModalityConfig("mri", 1, (8, 8, 8), 4, 1)))
    model = ImputeMAE(cfg)
    batch, rng = make_batch(cfg), new_rng(2)
    compiled = torch.compile(model.forward_pretrain, fullgraph=True, backend="aot_eager")
    loss, _ = compiled(batch, rng)
    torch.testing.assert_close(loss, model.forward_pretrain(batch, rng)[0])
    loss.backward()
    assert model.mask_token.grad is not None


# --------------------------------------------------------------------------- imputation
def test_impute_is_deterministic_and_raw_shaped():
    torch.manual_seed(0)
    cfg = tiny_config(dropout=0.1)
    model = ImputeMAE(cfg).train()
    batch = make_batch(cfg)
    a, b = model.impute(batch), model.impute(batch)
    assert model.training  # the caller's mode is restored
    for i, m in enumerate(cfg.modalities):
        assert a[m.name].shape == (batch.size, *m.shape) and a[m.name].dtype == torch.float32
        assert torch.equal(a[m.name], b[m.name])
        have = batch.present[:, i]
        assert torch.equal(a[m.name][have], batch.inputs[m.name][have])  # present rows keep their input
    raw = model.impute(batch, keep_present=False)
    missing = ~batch.present[:, 2]
    assert torch.equal(raw["mri"][missing], a["mri"][missing]) and torch.isfinite(raw["mri"]).all()


def test_impute_leaves_clinical_only_patients_nan_and_the_others_unchanged():
    cfg = tiny_config()
    model = ImputeMAE(cfg)
    batch = make_batch(cfg)
    batch.present[[1, 4]] = False  # two patients with clinical data only
    for x in batch.inputs.values():
        x[[1, 4]] = 0.0
    out = model.impute(batch)
    keep = torch.tensor([0, 2, 3, 5])
    alone = model.impute(Batch({k: v[keep] for k, v in batch.inputs.items()}, batch.present[keep],
                               batch.clinical[keep], batch.time[keep], batch.event[keep], cfg.names))
    for name in cfg.names:
        assert out[name][[1, 4]].isnan().all()
        # the patients with data get the same imputation as without the clinical-only ones beside them
        torch.testing.assert_close(out[name][keep], alone[name])


# --------------------------------------------------------------------------- fine-tuning
@pytest.mark.parametrize("missing", ["mask", "impute"])
@pytest.mark.parametrize("clinical_mode", ["tokens", "concat"])
def test_clinical_only_patient_has_finite_logits(missing, clinical_mode):
    torch.manual_seed(0)
    cfg = tiny_config(missing=missing, clinical_mode=clinical_mode, freeze="none")
    model = fitted_survival_model(cfg)
    present = torch.ones(3, 3, dtype=torch.bool)
    present[0] = False  # patient 0: clinical data only
    batch = make_batch(cfg, present)
    batch.clinical[0] = float("nan")  # ... and every clinical value unknown
    logits = model(batch)
    assert logits.shape == (3, cfg.n_bins) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_missing_modality_does_not_reach_the_logits():
    torch.manual_seed(0)
    cfg = tiny_config(missing="mask", fusion_dropout=0.0)
    model = fitted_survival_model(cfg).eval()
    present = torch.ones(2, 3, dtype=torch.bool)
    present[0, 1] = False
    batch = make_batch(cfg, present)
    before = model(batch)
    batch.inputs["wsi"][0] = torch.randn_like(batch.inputs["wsi"][0])
    torch.testing.assert_close(model(batch), before, rtol=0, atol=0)


def test_freezing_policies():
    cfg = tiny_config()

    def trainable(model: SurvivalModel) -> dict[str, set[str]]:
        out = {}
        for name, enc in model.mae.encoders.items():
            out[name] = {n for n, p in enc.named_parameters() if p.requires_grad}
        return out

    paper = trainable(SurvivalModel(ImputeMAE(cfg), cfg.replace(freeze="paper")))
    assert paper["wsi"] == set() and paper["mri"] == set()
    # RNA has 2 blocks: only the last one and the final norm are trainable
    assert paper["rna"] and all(n.startswith(("transformer.blocks.1.", "transformer.norm.")) for n in paper["rna"])
    code = trainable(SurvivalModel(ImputeMAE(cfg), cfg.replace(freeze="authors_code")))
    assert code["wsi"] and all(n.startswith(("transformer.blocks.0.", "transformer.norm.")) for n in code["wsi"])
    assert code["mri"] == set()
    model = SurvivalModel(ImputeMAE(cfg), cfg.replace(freeze={"mri": -1, "rna": 0, "wsi": 0}))
    assert all(p.requires_grad for p in model.mae.encoders["mri"].parameters())
    assert not any(p.requires_grad for p in model.mae.encoders["rna"].parameters())
    # the decoder is never fine-tuned; the fusion block and head always are
    assert not any(p.requires_grad for p in model.mae.decoder.parameters()) and not model.mae.mask_token.requires_grad
    assert all(p.requires_grad for p in model.head.parameters())


def test_survival_prediction_and_saved_state(tmp_path):
    pytest.importorskip("pyimputmae.survival")
    from pyimputmae.survival import IntervalCuts

    torch.manual_seed(0)
    cfg = tiny_config()
    model = fitted_survival_model(cfg)
    batch = make_batch(cfg)
    model.interval_cuts = IntervalCuts.fit(batch.time, n_bins=cfg.n_bins)
    model.mae.preprocessing = {"rna": {"genes": ["A", "B"], "median": torch.tensor([1.5])}}
    loss = model.loss(batch)
    assert torch.isfinite(loss)
    surv = model.predict_survival(batch)
    assert surv.shape == (batch.size, cfg.n_bins + 1)
    assert torch.all(surv[:, 0] == 1) and torch.all(surv[:, 1:] <= surv[:, :-1])
    path = tmp_path / "model.pt"
    torch.save({"config": cfg.to_dict(), "state": model.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    again = SurvivalModel(ImputeMAE(ModelConfig.from_dict(saved["config"])))
    again.load_state_dict(saved["state"])
    assert torch.equal(again.predict_survival(batch), surv)
    assert again.clinical.fitted and again.mae.preprocessing["rna"]["median"] == [1.5]
    torch.testing.assert_close(again.cuts, model.cuts)


# --------------------------------------------------------------------------- configuration
def test_paper_config_token_counts_and_parameter_count():
    cfg = ModelConfig.paper()
    assert cfg.lengths == (32, 24, 256, 64) and cfg.keeps == (16, 12, 128, 32)
    assert [m.depth for m in cfg.modalities] == [6, 6, 4, 4]
    n = count_parameters(ImputeMAE("paper"))
    assert 19_000_000 < n < 23_000_000  # the anchor's plain-PyTorch model has 21.5 M


def test_config_round_trips_through_json():
    for cfg in (ModelConfig.paper(), ModelConfig.small(), tiny_config(mask_ratio={"mri": 0.75}, freeze={"rna": 2})):
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert ImputeMAE("small").config == ModelConfig.small()


@pytest.mark.parametrize(("make", "words"), [
    (lambda: ModalityConfig("mri", 1, (64, 60, 64), 16, 4), ["'mri'", "60", "axis 1", "16"]),
    (lambda: tiny_config(freeze={"ct": 1}), ["unknown modality", "'ct'"]),
    (lambda: tiny_config(mask_ratio={"pet": 0.5}), ["unknown modality", "'pet'"]),
    (lambda: tiny_config(mask_ratio=0.9), ["'rna'", "no visible token"]),
    (lambda: tiny_config(missing="drop"), ["missing", "'drop'"]),
    # impute() gives per-patch normalised patches with norm_pix: the encoders would read them as raw input
    (lambda: tiny_config(missing="impute", norm_pix=True), ["missing='impute'", "norm_pix=True", "norm_pix=False"]),
    (lambda: tiny_config(dim=17), ["dim", "17", "head"]),
    (lambda: ModelConfig.from_dict({**tiny_config().to_dict(), "depth": 3}), ["unknown ModelConfig keys", "depth"]),
    (lambda: ModelConfig.named("huge"), ["huge", "paper"]),
])
def test_bad_configuration_is_named(make, words):
    with pytest.raises(ValueError) as err:
        make()
    for w in words:
        assert w in str(err.value)


def test_bad_batches_are_named():
    cfg = tiny_config()
    model = ImputeMAE(cfg)
    batch = make_batch(cfg)
    extra = Batch({**batch.inputs, "ct": torch.zeros(6, 1, 8)}, torch.ones(6, 4, dtype=torch.bool), batch.clinical,
                  batch.time, batch.event, (*cfg.names, "ct"))
    with pytest.raises(ValueError, match=r"'ct'.*not configured"):
        model.forward_pretrain(extra, new_rng(0))
    wrong = make_batch(cfg)
    wrong.inputs["wsi"] = torch.zeros(6, 3, 8, 12)
    with pytest.raises(ValueError, match=r"'wsi'.*\(6, 3, 8, 12\).*axis 3"):
        model.forward_pretrain(wrong, new_rng(0))
    nobody = make_batch(cfg, torch.zeros(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no patient in this batch has any of the modalities rna, wsi, mri"):
        model.forward_pretrain(nobody, new_rng(0))
    # impute() has nothing to reconstruct from for a clinical-only patient: NaN, not an error
    assert all(v.isnan().all() for v in model.impute(nobody).values())
    empty = Batch({}, torch.zeros(6, 0, dtype=torch.bool), batch.clinical, batch.time, batch.event, ())
    with pytest.raises(ValueError, match="none of the model's modalities"):
        model.forward_pretrain(empty, new_rng(0))
    fine = fitted_survival_model(cfg, model)
    with pytest.raises(ValueError, match=r"batch.clinical must be \(N, 3\)"):
        fine(Batch(batch.inputs, batch.present, batch.clinical[:, :2], batch.time, batch.event, cfg.names))


# --------------------------------------------------------------------------- benchmark script
@pytest.mark.slow
def test_e2e_benchmark_dry_runs_on_cpu(tmp_path):
    e2e_step = tool_module("e2e_step")
    out = tmp_path / "e2e.json"
    rc = e2e_step.main(["--device", "cpu", "--config", "small", "--steps", "2", "--batch", "4", "--warmup", "1",
                        "--modes", "eager,train-graph", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["reference"] is None
    # train-graph: train(cuda_graph=True)'s step, the library's GraphedStep (on the CPU without a graph)
    for mode in ("eager", "train-graph"):
        r = result["ours"][mode]
        assert r["patients_per_s"] > 0 and r["step_ms"] > 0 and math.isfinite(r["loss_last"]), mode


def test_e2e_benchmark_keeps_the_modes_that_finished_when_a_later_one_does_not(tmp_path, monkeypatch):
    """tools/e2e_step.py rewrites --json after each mode: a call stopped during a later mode (the GPU
    check's timeout, SIGTERM) or a mode that raises still leaves the modes measured before it."""
    e2e_step = tool_module("e2e_step")
    figures = {"step_ms": 10.0, "patients_per_s": 400.0, "peak_GB": None, "backends": {}}

    def fake_run_mode(args):
        if args.worker == "graph":
            raise SystemExit(143)  # what the SIGTERM handler raises on CUDA
        return dict(figures)

    monkeypatch.setattr(e2e_step, "run_mode", fake_run_mode)
    out = tmp_path / "run" / "e2e.json"
    with pytest.raises(SystemExit):
        e2e_step.main(["--device", "cpu", "--modes", "eager,graph", "--json", str(out)])
    result = json.loads(out.read_text())
    assert result["ours"] == {"eager": figures}
    assert not (tmp_path / "run" / "e2e.json.tmp").exists()


def test_saved_activation_report_counts_both_models(capsys):
    """tools/saved_activations.py: ours and the anchor's model (when ../shared is beside the checkout)
    at batch 2, each with a positive figure; the anchor's figure is larger, as at batch 96."""
    tool = tool_module("saved_activations")
    assert tool.main(["--device", "cpu", "--batch", "2"]) == 0
    lines = {line.split(" saved ")[0].strip(): float(line.split(" saved ")[1].split()[0])
             for line in capsys.readouterr().out.splitlines() if " saved " in line}
    ours = lines["ours (ImputeMAE, paper config)"]
    assert ours > 0
    if tool.DEFAULT_REF.exists():
        assert lines["anchor (ref_step_bench.py Ref)"] > ours


def test_step_ops_counts_what_computes_per_phase(capsys):
    """tools/step_ops.py: one step of ours counted per phase — under bf16 autocast the casts are
    there, views and empty allocations are not, the fused AdamW is a handful of operations — and the
    anchor's model beside it when ../shared is there."""
    tool = tool_module("step_ops")
    cpu = torch.device("cpu")
    record = tool.census(*tool.ours(cpu, 2, "small"), cpu, True)
    counts = record.counts
    assert set(counts) == {"forward", "backward", "optimizer"}
    every = collections.Counter()
    for phase in counts.values():
        every.update(phase)
    assert counts["forward"]["aten._to_copy.default"] > 0 and counts["backward"]["aten.mm.default"] > 0
    assert not [op for op in every if op in ("aten.view.default", "aten.t.default", "aten.detach.default",
                                              "aten.empty.memory_format", "aten._local_scalar_dense.default")]
    assert "aten._fused_adamw_.default" in counts["optimizer"] and sum(counts["optimizer"].values()) < 10
    fp32 = tool.census(*tool.ours(cpu, 2, "small"), cpu, False).counts
    assert sum(fp32["forward"].values()) < sum(counts["forward"].values())  # no autocast: fewer casts
    # bytes: every counted operation is charged some; the activations' grow with the batch
    assert set(record.bytes["forward"]) == set(counts["forward"]) and min(record.bytes["forward"].values()) > 0
    bigger = tool.census(*tool.ours(cpu, 8, "small"), cpu, True)
    assert bigger.counts == record.counts
    assert sum(bigger.bytes["forward"].values()) > 2 * sum(record.bytes["forward"].values())
    assert tool.main(["--config", "small", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ours (small configuration): ") and "dtype casts (_to_copy)" in out
    assert "bytes of the tensors they take and return: " in out
    assert ("anchor (ref_step_bench.py Ref): " in out) == tool.DEFAULT_REF.exists()


def test_step_ops_counts_a_triton_launch_as_one_operation(monkeypatch):
    """With the pre-norm LayerNorm on Triton (the interpreter here) each launch is one operation and the
    interpreter's own tensor operations inside it are none: PyTorch's LayerNorm and its casts go, one
    forward launch and one backward launch per pre-norm LayerNorm come."""
    tool = tool_module("step_ops")
    cpu = torch.device("cpu")
    monkeypatch.setenv("PYIMPUTMAE_BACKEND", "layer_norm=reference")
    torch_ln = tool.census(*tool.ours(cpu, 2, "small"), cpu, True).counts
    monkeypatch.setenv("PYIMPUTMAE_BACKEND", "layer_norm=triton")
    triton_ln = tool.census(*tool.ours(cpu, 2, "small"), cpu, True).counts
    fwd = triton_ln["forward"]["triton._layer_norm_fwd_kernel"]
    assert fwd == triton_ln["backward"]["triton._layer_norm_bwd_kernel"] > 0

    def fewer(op: str, phase: str) -> int:
        return torch_ln[phase][f"aten.{op}.default"] - triton_ln[phase][f"aten.{op}.default"]

    assert fewer("native_layer_norm", "forward") == fwd and fewer("native_layer_norm_backward", "backward") == fwd
    assert fewer("_to_copy", "forward") == 2 * fwd and fewer("_to_copy", "backward") == 4 * fwd


def test_e2e_torchln_mode_runs_pytorchs_layer_norm_and_puts_the_choice_back(monkeypatch):
    """tools/e2e_step.py's ``…-torchln`` modes: the pre-norm sublayers on PyTorch's LayerNorm whatever
    PYIMPUTMAE_BACKEND chose for them, the other families as chosen; the variable restored after (the
    CPU dry run runs every mode in one process)."""
    e2e_step = tool_module("e2e_step")
    assert e2e_step.with_layer_norm("", "reference") == "layer_norm=reference"
    assert e2e_step.with_layer_norm("masking=ext, layer_norm=triton", "reference") == "masking=ext,layer_norm=reference"
    assert (e2e_step.with_layer_norm("triton", "reference")
            == "patch_embed=triton,masking=triton,masked_mse=triton,layer_norm=reference")
    monkeypatch.setenv("PYIMPUTMAE_BACKEND", "masking=reference,layer_norm=triton")
    args = argparse.Namespace(device="cpu", config="small", batch=2, steps=1, warmup=1, dtype="bf16",
                              worker="eager-torchln")
    r = e2e_step.run_mode(args)
    assert r["backends"]["layer_norm"] == "reference" and r["backends"]["masking"] == "reference"
    assert math.isfinite(r["loss_last"])
    assert os.environ["PYIMPUTMAE_BACKEND"] == "masking=reference,layer_norm=triton"

"""pyimputmae.train(): pre-train → fine-tune → evaluate, checkpoints, kill-and-resume, load, errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from op_testing import TINY_MODEL

import pyimputmae
from pyimputmae.data.synthetic import make_cohort
from pyimputmae.model.config import ModelConfig
from pyimputmae.training import TrainConfig, load, predict_survival, split_indices, train

TINY = ModelConfig.small(**TINY_MODEL)
TINY_SHAPES = {m.name: m.shape for m in TINY.modalities}
FAST = {"pretrain_epochs": 2, "finetune_epochs": 2, "pretrain_batch_size": 32, "finetune_batch_size": 32,
        "progress": False, "log_every": 1}


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(n_patients=96, shapes=TINY_SHAPES, seed=3)


def test_train_pretrains_finetunes_and_writes_everything(tmp_path, cohort):
    res = train(cohort=cohort, model=TINY, out_dir=str(tmp_path), checkpoint_every=2, **FAST)
    for key in ("model", "metrics", "history", "checkpoint", "config", "training_curves", "risk_groups"):
        assert Path(res.paths[key]).exists(), key
    for key in ("training_curves", "risk_groups"):  # figures: PNG files
        assert Path(res.paths[key]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", key
    assert {"train", "test"} <= set(res.metrics)
    for m in res.metrics.values():
        assert set(m) == {"c_index", "ibs", "cs_score", "harrell_c"}
        assert all(np.isfinite(v) for v in m.values())
    stages = {r["stage"] for r in res.history}
    assert stages == {"pretrain", "finetune"}
    pre = [r for r in res.history if r["stage"] == "pretrain"]
    assert all(np.isfinite(r["loss"]) and r["patients_per_s"] > 0 for r in pre)
    assert {"rna", "dnam", "wsi", "mri"} <= set(pre[0])  # per-modality losses are logged
    lines = Path(res.paths["history"]).read_text().splitlines()
    assert len(lines) == len(res.history)
    assert json.loads(Path(res.paths["metrics"]).read_text()) == res.metrics


def test_loaded_model_predicts_exactly_like_the_trained_one(tmp_path, cohort):
    res = train(cohort=cohort, model=TINY, out_dir=str(tmp_path), **FAST)
    model = load(res.paths["model"])
    idx = cohort.indices("test")
    np.testing.assert_array_equal(predict_survival(res.model.cpu(), cohort, idx), predict_survival(model, cohort, idx))
    # everything fitted on the training split travels with it
    np.testing.assert_array_equal(model.cuts.numpy(), res.model.cuts.numpy())
    assert torch.equal(model.clinical.median, res.model.clinical.median)
    out = model.mae.impute(cohort.batch(idx[:4]))
    assert out["mri"].shape == (4, *TINY_SHAPES["mri"])


def test_skipping_pretraining_and_loading_a_pretrained_model(tmp_path, cohort):
    pre = train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "pre"), finetune=False, **FAST)
    assert pre.metrics == {} and type(pre.model).__name__ == "ImputeMAE"
    fine = train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "fine"), pretrain=False,
                 pretrain_from=pre.paths["model"], **FAST)
    # the fine-tuned encoder started from the pre-trained weights, not from a fresh init
    assert "test" in fine.metrics
    other = TINY.replace(dim=16, decoder_dim=16)
    with pytest.raises(ValueError, match=r"(?s)pretrain_from=.*pre.model.pt: its pre-trained model does not fit the "
                                         r"configured model \(\d+ parameters differ\).*mask_token \(32,\) in the file, "
                                         r"\(16,\) configured.*\n  dim: 32 in the file, 16 now"):
        train(cohort=cohort, model=other, out_dir=str(tmp_path / "other"), pretrain=False,
              pretrain_from=pre.paths["model"], **FAST)
    assert not (tmp_path / "other").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="nothing to do"):
        TrainConfig.load(pretrain=False, finetune=False)


def test_fine_tuning_without_pre_training_trains_every_encoder(tmp_path, cohort):
    # a named model's freezing (the paper's: MRI and WSI encoders frozen) is for pre-trained encoders;
    # without pre-training it used to leave randomly initialised encoders frozen, never learning
    small = {"dim": 32, "heads": 2, "mlp": 64, "decoder_dim": 32, "decoder_heads": 2, "decoder_mlp": 64}
    res = train(cohort=cohort, model="small", model_overrides=small, out_dir=str(tmp_path / "scratch"),
                pretrain=False, **FAST)
    assert res.model.config.freeze == "none"
    assert all(p.requires_grad for p in res.model.mae.encoders.parameters())
    # a freezing policy set explicitly is kept, with a warning naming the encoders it leaves untrained
    with pytest.warns(RuntimeWarning, match=r"nothing is pre-trained .* freeze='paper' keeps the randomly "
                                            r"initialised encoder\(s\) of 'rna', 'dnam', 'wsi', 'mri' .* set "
                                            r"freeze='none'"):
        res = train(cohort=cohort, model=TINY.replace(freeze="paper"), out_dir=str(tmp_path / "frozen"),
                    pretrain=False, **FAST)
    assert not any(p.requires_grad for p in res.model.mae.encoders["mri"].parameters())


def test_config_from_yaml_and_json_files(tmp_path):
    (tmp_path / "c.yaml").write_text("seed: 4\npretrain_epochs: 3\nmodel: small\n")
    (tmp_path / "c.json").write_text(json.dumps({"seed": 5, "finetune_lr": 0.001}))
    assert TrainConfig.load(tmp_path / "c.yaml").pretrain_epochs == 3
    assert TrainConfig.load(tmp_path / "c.json", seed=9).seed == 9
    with pytest.raises(ValueError, match="unknown training setting.*'epochs'"):
        TrainConfig.load({"epochs": 3})
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        TrainConfig.load(tmp_path / "nope.yaml")


def test_clear_errors_for_bad_data(tmp_path, cohort):
    no_events = make_cohort(n_patients=64, shapes=TINY_SHAPES, seed=1)
    no_events.event.zero_()
    with pytest.raises(ValueError, match="no patient of the training split .* has an event"):
        train(cohort=no_events, model=TINY, out_dir=str(tmp_path), **FAST)
    wrong = make_cohort(n_patients=64, shapes={**TINY_SHAPES, "mri": (1, 16, 16, 16)}, seed=1)
    with pytest.raises(ValueError, match=r"modality 'mri': an in-memory cohort holds inputs of shape \(1, 16, 16, 16\)"
                                         r" per patient, the model expects \(1, 32, 32, 32\) \(patch 8\)"):
        train(cohort=wrong, model=TINY, out_dir=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match="spatial size 1000 .* not a positive multiple of its patch size 64"):
        ModelConfig.small(modalities=({"name": "rna", "channels": 1, "spatial": (1000,), "patch": 64, "depth": 1},))
    from pyimputmae.model.mae import ImputeMAE, new_rng

    batch = cohort.batch(np.arange(4))
    batch.present = torch.zeros_like(batch.present)
    with pytest.raises(ValueError, match="no patient in this batch has any of the modalities rna, dnam, wsi, mri"):
        ImputeMAE(TINY).forward_pretrain(batch, new_rng(0))


def test_nan_inputs_or_survival_are_refused_before_training_naming_the_patients(tmp_path):
    """A NaN anywhere in the inputs made every weight NaN and failed only at the evaluation, after
    the whole run, with lifelines' "NaNs detected in inputs"; now refused before anything is written."""
    out = tmp_path / "run"
    bad = make_cohort(n_patients=32, shapes=TINY_SHAPES, seed=1)
    has, lacks = int(np.flatnonzero(bad.present[:, 0])[0]), int(np.flatnonzero(~bad.present[:, 0])[0])
    bad.inputs["rna"][has, 0, 3] = float("inf")
    with pytest.raises(ValueError, match=rf"modality 'rna' of an in-memory cohort holds NaN or infinite values for 1 "
                                         rf"patient\(s\) \({bad.ids[has]}\)\. They would make every weight NaN"):
        train(cohort=bad, model=TINY, out_dir=str(out), **FAST)
    bad.inputs["rna"][has] = 0.0
    bad.inputs["rna"][lacks] = float("nan")  # a missing modality written as NaN rather than zeros
    with pytest.raises(ValueError, match=rf"values for 1 patient\(s\) \({bad.ids[lacks]}\); 1 of them lack it "
                                         r"\(present is False\): a missing modality's inputs must be zeros"):
        train(cohort=bad, model=TINY, out_dir=str(out), **FAST)
    bad.inputs["rna"][lacks] = 0.0
    patient = int(bad.indices("train")[2])
    bad.time[patient] = float("nan")
    with pytest.raises(ValueError, match=rf"1 patient\(s\) of the training split of an in-memory cohort have no usable "
                                         rf"survival \({bad.ids[patient]}; the first: time nan, event"):
        train(cohort=bad, model=TINY, out_dir=str(out), **FAST)
    assert not out.exists()


def test_manifest_val_split_is_evaluated_and_never_mixed_with_val_fold(tmp_path):
    """Patients the manifest puts in split 'val' were silently neither trained on nor evaluated."""
    cohort = make_cohort(n_patients=48, shapes=TINY_SHAPES, seed=2)
    val = cohort.indices("train")[:8]
    cohort.split = cohort.split.copy()
    cohort.split[val] = "val"
    train_idx, val_idx, _ = split_indices(cohort, None)
    assert sorted(val_idx) == sorted(val) and not set(train_idx) & set(val)
    res = train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "run"), **FAST)
    assert {"train", "val", "test"} <= set(res.metrics)
    with pytest.raises(ValueError, match=rf"val_fold=1 would hold out fold 1 of the training split for validation, but "
                                         rf"the cohort already has 8 patients in split 'val' \({cohort.ids[val[0]]}, .*"
                                         r"Leave val_fold unset"):
        train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "folds"), val_fold=1, **FAST)


def test_tiny_splits_and_splits_without_deaths_are_reported_not_fatal(tmp_path):
    """A one-patient test split crashed the evaluation (Harrell's C: no admissible pair) after the
    whole run, losing model.pt; a split without deaths, or a modality no training patient has,
    went unmentioned."""
    cohort = make_cohort(n_patients=40, shapes=TINY_SHAPES, seed=2)
    test = cohort.indices("test")
    cohort.split = cohort.split.copy()
    cohort.split[test[1:4]] = "val"
    cohort.split[test[4:]] = "train"
    cohort.event[test[0]] = 1.0
    cohort.event[torch.as_tensor(test[1:4])] = 0.0  # no death in the validation split
    cohort.present[torch.as_tensor(cohort.indices("train")), 3] = False  # no training patient has MRI
    with pytest.warns(RuntimeWarning) as caught:
        res = train(cohort=cohort, model=TINY, out_dir=str(tmp_path), **FAST)
    messages = [str(w.message) for w in caught]
    assert any(re.search(r"no patient of the training split \(\d+ patients\) has modality 'mri': the model cannot "
                         r"learn to read or impute it", m) for m in messages), messages
    assert any(m.startswith("the val split is not evaluated: none of its 3 patients has an event") for m in messages)
    assert Path(res.paths["model"]).exists() and "val" not in res.metrics
    assert np.isnan(res.metrics["test"]["c_index"]) and np.isnan(res.metrics["test"]["harrell_c"])
    # metrics.json is strict JSON: the undefined C-indices are null (Python's NaN is refused by jq, R, JS)
    def refuse(constant):
        raise AssertionError(f"metrics.json holds {constant}")
    saved = json.loads(Path(res.paths["metrics"]).read_text(), parse_constant=refuse)
    assert saved["test"]["c_index"] is None and saved["test"]["harrell_c"] is None


def test_resume_refuses_a_checkpoint_of_another_run_and_allows_more_epochs(tmp_path, cohort):
    out = tmp_path / "run"
    run = dict(cohort=cohort, model=TINY, out_dir=str(out), **{**FAST, "pretrain_epochs": 1, "finetune_epochs": 1})
    first = train(**run)
    ckpt = out / "checkpoints" / "last.pt"
    before = {f: (out / f).read_bytes() for f in ("metrics.jsonl", "config.json", "model.pt", "checkpoints/last.pt")}
    other_cohort = make_cohort(n_patients=80, shapes=TINY_SHAPES, seed=4)
    refused = [
        ({"seed": 5}, r"seed: 0 in the checkpoint, 5 now"),
        ({"cohort": other_cohort}, r"cohort: 96 patients \(train \d+, test \d+\) from an in-memory cohort in the "
                                   r"checkpoint, 80 patients"),
        ({"model": TINY.replace(dim=16, decoder_dim=16)}, r"model.dim: 32 in the checkpoint, 16 now"),
        ({"finetune_lr": 1e-3}, r"finetune_lr: 0.0001 in the checkpoint, 0.001 now"),
        ({"pretrain_epochs": 3}, r"pretrain_epochs: 1 in the checkpoint, 3 now, but pre-training has finished and "
                                 r"fine-tuning has started"),
    ]
    for change, message in refused:
        with pytest.raises(ValueError, match=rf"(?s)cannot resume from {ckpt}: .*{message}.*choose another out_dir"):
            train(**{**run, **change}, resume=True)
    # nothing of the old run was touched
    assert {f: (out / f).read_bytes() for f in before} == before
    # the number of epochs may change: the run goes on from where it stopped
    longer = train(**{**run, "finetune_epochs": 2, "num_threads": 1}, resume=True)
    epochs = [r["epoch"] for r in longer.history if r["stage"] == "finetune"]
    assert epochs[-1] == 1 and longer.history[:len(first.history)] == first.history


def test_an_out_dir_holding_a_run_is_not_overwritten_by_accident(tmp_path, cohort):
    run = dict(cohort=cohort, model=TINY, out_dir=str(tmp_path), **{**FAST, "pretrain_epochs": 1, "finetune": False})
    train(**run)  # an existing, empty out_dir is fine
    log = (tmp_path / "metrics.jsonl").read_bytes()
    with pytest.raises(FileExistsError, match=rf"out_dir {tmp_path} already holds a training run \(checkpoints/last.pt,"
                                              r" model.pt.*resume=True .*overwrite=True .*another out_dir"):
        train(**run)
    assert (tmp_path / "metrics.jsonl").read_bytes() == log
    assert (tmp_path / "training_curves.png").exists()
    (tmp_path / "tensorboard").mkdir()  # files of the old run that the new one would not rewrite
    (tmp_path / "risk_groups.png").write_bytes(b"old figure")  # (no fine-tuning: no risk groups drawn)
    (tmp_path / "notes.txt").write_text("mine")
    train(**run, overwrite=True)
    assert not (tmp_path / "tensorboard").exists() and (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "risk_groups.png").exists()
    (tmp_path / "checkpoints" / "last.pt").unlink()
    with pytest.raises(FileExistsError, match="no checkpoint .* only the finished run's model.pt"):
        train(**run, resume=True)


def test_an_out_dir_that_is_a_file_is_refused_in_one_line_before_anything_runs(tmp_path, capsys):
    from pyimputmae import cli

    (tmp_path / "results").write_text("not a folder")
    for out, where in ((tmp_path / "results", "is a file"), (tmp_path / "results" / "run",
                                                            f"is inside {tmp_path / 'results'}, which is a file")):
        assert cli.main(["train", "--out", str(out), "--set", "progress=false"]) == 1
        err = capsys.readouterr().err
        assert err == f"pyimputmae train: error: out_dir {out} {where}, not a folder: choose another out_dir\n", err


def test_the_cli_passes_overwrite_and_one_model_setting(monkeypatch):
    from pyimputmae import cli, training

    seen = {}

    def fake_train(config, **overrides):
        seen.update(overrides, config=config)
        return training.TrainResult(model=None, metrics={}, history=[], paths={"model": "m.pt"}, config=None)

    monkeypatch.setattr(training, "train", fake_train)
    assert cli.main(["train", "--overwrite", "--set", 'model.clinical_features=["age"]', "pretrain_lr=1e-3"]) == 0
    assert seen["overwrite"] is True and seen["model.clinical_features"] == ["age"]
    cfg = TrainConfig.load(seen["config"], **{k: v for k, v in seen.items() if k != "config"})
    assert cfg.model_overrides == {"clinical_features": ["age"]} and cfg.pretrain_lr == 1e-3


def test_the_cli_reports_a_stop_by_signal_with_its_exit_status(monkeypatch, capsys):
    from pyimputmae import cli, training

    for signal_name, status in (("SIGTERM", 143), ("SIGINT", 130)):
        def stopped(config, _name=signal_name, **overrides):
            raise training.TrainingInterrupted(f"stopped by {_name} at pretrain epoch 2 batch 5; checkpoint "
                                               "runs/x/checkpoints/last.pt holds everything so far: resume=True "
                                               "(pyimputmae train --resume) continues from there", _name,
                                               "runs/x/checkpoints/last.pt")

        monkeypatch.setattr(training, "train", stopped)
        assert cli.main(["train"]) == status
        assert capsys.readouterr().err.strip() == (
            f"pyimputmae train: stopped by {signal_name} at pretrain epoch 2 batch 5; checkpoint "
            "runs/x/checkpoints/last.pt holds everything so far: resume=True (pyimputmae train --resume) continues "
            "from there")


def test_the_model_takes_the_clinical_columns_of_the_data_unless_they_are_set(tmp_path, cohort):
    store_like = make_cohort(n_patients=96, shapes=TINY_SHAPES, seed=3)
    # what `pyimputmae preprocess` encodes by default: every manifest column, one-hot categories
    store_like.clinical_names = ["project=LGG", "age_years", "radiation"]
    tiny = {f: getattr(TINY, f) for f in ("dim", "heads", "mlp", "decoder_dim", "decoder_heads", "decoder_mlp")}
    small_shapes = dict(FAST, pretrain_epochs=1, finetune_epochs=1)
    explicit = {"clinical_features": ["radiation", "chemo", "age"]}
    for model, overrides in (("small", explicit), (TINY, {})):
        with pytest.raises(ValueError, match=r"configured clinical_features \['radiation', 'chemo', 'age'\] differ "
                                             r"from the clinical columns of the cohort \(an in-memory cohort\) "
                                             r"\['project=LGG', 'age_years', 'radiation'\].*Leave clinical_features "
                                             r"unset"):
            train(cohort=store_like, model=model, model_overrides=overrides, out_dir=str(tmp_path / "x"),
                  **small_shapes)
        assert not (tmp_path / "x").exists()  # refused before training
    # a named model without clinical_features set: the data's columns (TINY's modalities are small's)
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    res = train(cohort=store_like, model="small", model_overrides=tiny, out_dir=str(tmp_path / "run"),
                num_threads=1, deterministic=True, **small_shapes)
    assert res.model.config.clinical_features == ("project=LGG", "age_years", "radiation")
    assert load(res.paths["model"]).config == res.model.config and "test" in res.metrics
    # train() leaves torch's global settings as it found them
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)


def test_clear_errors_before_training_for_folds_devices_and_tensorboard(tmp_path, cohort, monkeypatch):
    out = tmp_path / "run"
    threads = torch.get_num_threads()
    with pytest.raises(ValueError, match=r"val_fold=7 is not a cross-validation fold of the cohort's training split: "
                                         r"its folds are 0, 1, 2, 3, 4"):
        train(cohort=cohort, model=TINY, out_dir=str(out), val_fold=7, num_threads=1, deterministic=True, **FAST)
    assert torch.get_num_threads() == threads and not torch.are_deterministic_algorithms_enabled()
    train_idx, val_idx, _ = split_indices(cohort, 2)
    assert len(val_idx) and not set(train_idx) & set(val_idx) and set(cohort.fold[val_idx]) == {2}
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda' but no CUDA GPU is visible to PyTorch"):
            train(cohort=cohort, model=TINY, out_dir=str(out), device="cuda", **FAST)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if it were not installed
    with pytest.raises(ImportError, match="tensorboard=True needs the tensorboard package: pip install tensorboard"):
        train(cohort=cohort, model=TINY, out_dir=str(out), tensorboard=True, **FAST)
    assert not out.exists()


def test_integer_patient_ids_and_synthetic_settings_from_yaml(tmp_path, cohort):
    """An in-memory cohort may number its patients; YAML's `5e-1` (a string) is a synthetic number too."""
    numbered = make_cohort(n_patients=64, shapes=TINY_SHAPES, seed=1)
    numbered.ids = list(np.arange(64))
    train(cohort=numbered, model=TINY, out_dir=str(tmp_path / "ids"), **{**FAST, "pretrain_epochs": 1,
                                                                         "finetune": False})
    cfg = TrainConfig(synthetic={"n_patients": 40.0, "event_rate": "5e-1"})
    assert cfg.synthetic == {"n_patients": 40, "event_rate": 0.5} and type(cfg.synthetic["n_patients"]) is int
    with pytest.raises(ValueError, match=r"synthetic.n_patients must be an integer, got 'forty'"):
        TrainConfig(synthetic={"n_patients": "forty"})


def assert_same_run(resumed, whole) -> None:
    """A resumed run equals the uninterrupted one: every log record (but its timing) and every weight."""
    timing = "patients_per_s"
    assert [{k: v for k, v in r.items() if k != timing} for r in resumed.history] == [
        {k: v for k, v in r.items() if k != timing} for r in whole.history]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])] == []


def test_fp16_trains_with_loss_scaling_and_a_crash_resumes_to_the_same_weights(tmp_path, cohort, monkeypatch):
    """amp="fp16" (what amp="auto" picks on a GPU without native bf16) trains under GradScaler: the
    loss scale is logged, steps whose scaled gradients overflow are skipped and the scale lowered, and
    the scale is checkpointed, so a run that crashes and resumes ends with the uninterrupted run's
    weights and history (a resumed scaler restarting at 65,536 would skip other steps)."""
    from pyimputmae import training

    run = dict(cohort=cohort, model=TINY, amp="fp16", deterministic=True, num_threads=1, checkpoint_every=1,
               **{**FAST, "pretrain_epochs": 3, "finetune_epochs": 3, "pretrain_batch_size": 16,
                  "finetune_batch_size": 16})
    whole = train(out_dir=str(tmp_path / "whole"), **run)
    scales = [r["loss_scale"] for r in whole.history]
    assert all(np.isfinite(r["loss"]) for r in whole.history)
    assert len(set(scales)) > 1, f"the loss scale never changed ({scales[0]}): the test would not see it restored"
    assert all(np.isfinite(v) for m in whole.metrics.values() for v in m.values())

    saves, save = [], training._Trainer._save

    def crash_after_some_saves(self, pos, *args):
        save(self, pos, *args)
        saves.append(pos.step)
        if pos.stage == "finetune" and pos.step == 4:
            raise KeyboardInterrupt  # a crash right after a checkpoint

    monkeypatch.setattr(training._Trainer, "_save", crash_after_some_saves)
    with pytest.raises(KeyboardInterrupt):
        train(out_dir=str(tmp_path / "crashed"), **run)
    monkeypatch.setattr(training._Trainer, "_save", save)
    resumed = train(out_dir=str(tmp_path / "crashed"), resume=True, **run)
    assert_same_run(resumed, whole)


def test_a_run_killed_while_writing_resumes_from_intact_files_and_leaves_no_temporaries(tmp_path, cohort,
                                                                                         monkeypatch):
    """A crash while the resume rewrites metrics.jsonl from the checkpoint's history leaves the
    earlier log whole (it was truncated first, then rewritten); the temporaries a SIGKILL inside a
    checkpoint or model write leaves (each as large as the file) are removed by the next run, which
    ends as the uninterrupted run."""
    from pyimputmae import checkpoint, training

    run = dict(cohort=cohort, model=TINY, deterministic=True, num_threads=1, checkpoint_every=1, **FAST)
    whole = train(out_dir=str(tmp_path / "whole"), **run)
    out = tmp_path / "killed"
    save = training._Trainer._save

    def crash_after_a_finetune_save(self, pos, *args):
        save(self, pos, *args)
        if pos.stage == "finetune" and pos.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(training._Trainer, "_save", crash_after_a_finetune_save)
    with pytest.raises(KeyboardInterrupt):
        train(out_dir=str(out), **run)
    monkeypatch.setattr(training._Trainer, "_save", save)
    log = (out / "metrics.jsonl").read_text()
    assert len(log.splitlines()) > 2
    json_text, calls = checkpoint.json_text, []

    def crash_on_the_second_record(obj, indent=None):
        calls.append(obj)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return json_text(obj, indent)

    monkeypatch.setattr(checkpoint, "json_text", crash_on_the_second_record)
    with pytest.raises(KeyboardInterrupt):
        train(out_dir=str(out), resume=True, **run)
    monkeypatch.setattr(checkpoint, "json_text", json_text)
    assert (out / "metrics.jsonl").read_text() == log
    stale = [out / "checkpoints" / ".last.pt.99999.0123abcd.tmp", out / ".model.pt.99999.89abcdef.tmp"]
    for path in stale:
        path.write_bytes((out / "checkpoints" / "last.pt").read_bytes()[:1000])
    resumed = train(out_dir=str(out), resume=True, **run)
    assert_same_run(resumed, whole)
    assert not any(p.exists() for p in stale)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last.pt"]


def test_sigterm_stops_at_a_batch_with_a_checkpoint_and_the_resumed_run_loses_nothing(tmp_path, cohort, monkeypatch):
    """SIGTERM (a scheduler's time limit) in the middle of a gradient accumulation and of a logging
    window: train() finishes the batch, writes a checkpoint there (pending gradients, the window's
    running loss) and raises TrainingInterrupted; resuming gives the uninterrupted run's weights and
    log. No periodic checkpoint is due (checkpoint_every=1000): nothing but the stop saves."""
    import signal

    from pyimputmae import training

    run = dict(cohort=cohort, model=TINY, deterministic=True, num_threads=1, checkpoint_every=1000, grad_accum=2,
               **{**FAST, "pretrain_epochs": 3, "finetune_epochs": 2, "pretrain_batch_size": 16, "log_every": 3})
    whole = train(out_dir=str(tmp_path / "whole"), **run)
    batches = training._Trainer._batches

    def signal_during_a_batch(self, stage, idx, bs, pos):
        for epoch, b, rows in batches(self, stage, idx, bs, pos):
            if (stage, epoch, b) == ("pretrain", 1, 2):  # the first micro-batch of an accumulation pair
                signal.raise_signal(signal.SIGTERM)
            yield epoch, b, rows

    monkeypatch.setattr(training._Trainer, "_batches", signal_during_a_batch)
    handler = signal.getsignal(signal.SIGTERM)
    out = tmp_path / "stopped"
    with pytest.raises(training.TrainingInterrupted, match=rf"stopped by SIGTERM at pretrain epoch 1 batch 3; "
                                                           rf"checkpoint {out}/checkpoints/last.pt holds everything"):
        train(out_dir=str(out), **run)
    assert signal.getsignal(signal.SIGTERM) is handler  # train() puts the handlers back
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=False)
    assert saved["position"] == {"stage": "pretrain", "epoch": 1, "batch": 3, "step": saved["position"]["step"],
                                 "micro": 1}
    assert saved["partial_grads"] and saved["window"]["n"] > 0
    monkeypatch.setattr(training._Trainer, "_batches", batches)
    resumed = train(out_dir=str(out), resume=True, **run)
    assert_same_run(resumed, whole)


def test_a_stop_during_evaluation_is_honoured_and_resuming_writes_the_model(tmp_path, cohort, monkeypatch):
    import signal

    from pyimputmae import training

    run = dict(cohort=cohort, model=TINY, out_dir=str(tmp_path), **{**FAST, "pretrain_epochs": 1,
                                                                     "finetune_epochs": 1})
    evaluate = training.evaluate_model

    def evaluate_then_signal(*args, **kwargs):
        signal.raise_signal(signal.SIGTERM)
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(training, "evaluate_model", evaluate_then_signal)
    with pytest.raises(training.TrainingInterrupted, match="stopped by SIGTERM at the evaluation after training"):
        train(**run)
    assert not (tmp_path / "model.pt").exists()
    monkeypatch.setattr(training, "evaluate_model", evaluate)
    done = train(**run, resume=True)
    assert Path(done.paths["model"]).exists() and "test" in done.metrics


def test_signals_that_are_ignored_or_handled_outside_python_are_left_alone(monkeypatch):
    """A background job's SIGINT is ignored (SIG_IGN) and must stay so; a handler an embedding host
    installed in C reads as None and could not be put back: neither is taken over."""
    import signal

    from pyimputmae.training import StopRequests

    previous = signal.getsignal(signal.SIGINT)
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        with StopRequests():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    real = signal.getsignal
    monkeypatch.setattr(signal, "getsignal", lambda number: None if number == signal.SIGTERM else real(number))
    before = real(signal.SIGTERM)
    with StopRequests():
        assert real(signal.SIGTERM) is before  # not replaced


def test_logged_pretraining_parts_are_window_means_over_the_batches_that_have_the_modality():
    from pyimputmae.training import _Window

    w = _Window(torch.device("cpu"))
    nan = torch.tensor(float("nan"))
    w.add(torch.tensor(3.0), {"rna": torch.tensor(1.0), "mri": torch.tensor(2.0)}, 4)
    w.add(torch.tensor(1.0), {"rna": torch.tensor(0.5), "mri": nan}, 4)  # no row of this batch has MRI
    w.add(torch.tensor(2.0), {"rna": torch.tensor(0.0), "dnam": nan}, 4)
    rec = w.record()
    assert rec["loss"] == 2.0 and rec["rna"] == 0.5 and rec["mri"] == 2.0 and "dnam" not in rec
    again = _Window(torch.device("cpu"), w.state())  # through a checkpoint
    assert {k: v for k, v in again.record().items() if k != "patients_per_s"} == {
        k: v for k, v in rec.items() if k != "patients_per_s"}


def test_a_resume_that_trains_in_another_precision_says_so(tmp_path, cohort, monkeypatch):
    """amp="auto" resolves per device: a run resumed elsewhere may change precision; it is allowed
    (device may change on resume) but named, with the way to keep one."""
    from pyimputmae import training

    run = dict(cohort=cohort, model=TINY, out_dir=str(tmp_path), **{**FAST, "pretrain_epochs": 1,
                                                                     "finetune_epochs": 1})
    train(**run)
    monkeypatch.setattr(training, "amp_dtype", lambda amp, device: torch.bfloat16)  # as on another machine
    with pytest.warns(RuntimeWarning, match=r"last.pt: the run so far trained in float32, this resume trains in bf16 "
                                            r"autocast \(amp='auto' on cpu\); set amp to keep one precision"):
        train(**{**run, "finetune_epochs": 2}, resume=True)


def test_amp_auto_picks_bf16_only_where_the_gpu_has_it(monkeypatch):
    from pyimputmae import training

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert training.amp_dtype("auto", cpu) is None and training.amp_dtype("fp16", cpu) is torch.float16
    for capability, want in (((7, 5), torch.float16), ((7, 0), torch.float16), ((8, 0), torch.bfloat16),
                             ((9, 0), torch.bfloat16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert training.amp_dtype("auto", gpu) is want, capability
        assert training.amp_dtype("bf16", gpu) is torch.bfloat16 and training.amp_dtype("off", gpu) is None
    with pytest.raises(ValueError, match="amp must be one of 'auto', 'bf16', 'fp16', 'off', got 'fp8'"):
        TrainConfig(amp="fp8")


KILL_SCRIPT = textwrap.dedent("""
    import sys, torch
    from pyimputmae.data.synthetic import make_cohort
    from pyimputmae.model.config import ModelConfig
    from pyimputmae.training import train
    torch.set_num_threads(1)
    cfg = ModelConfig.small(dim=32, heads=2, mlp=64, decoder_dim=32, decoder_heads=2, decoder_mlp=64, freeze="none")
    cohort = make_cohort(n_patients=96, shapes={m.name: m.shape for m in cfg.modalities}, seed=3)
    train(cohort=cohort, model=cfg, out_dir=sys.argv[1], resume=sys.argv[2] == "resume", deterministic=True,
          num_threads=1, checkpoint_every=1, pretrain_epochs=3, finetune_epochs=3, pretrain_batch_size=16,
          finetune_batch_size=16, grad_accum=2, progress=False, log_every=1)
""")


def _run_training(script: Path, out: Path, mode: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_bitwise_identical_weights(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    ref = _run_training(script, tmp_path / "uninterrupted", "fresh")
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out

    victim = _run_training(script, tmp_path / "killed", "fresh")
    ckpt = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.time() + 600
    killed_at = None
    while time.time() < deadline and victim.poll() is None:
        if ckpt.exists():
            try:
                pos = torch.load(ckpt, weights_only=False)["position"]
            except Exception:  # being replaced right now: look again
                pos = None
            if pos and (pos["stage"] == "finetune" or pos["step"] >= 4):
                victim.send_signal(signal.SIGKILL)
                killed_at = pos
                break
        time.sleep(0.05)
    victim.wait(timeout=60)
    assert killed_at is not None and victim.returncode == -signal.SIGKILL, "the run ended before it could be killed"

    resumed = _run_training(script, tmp_path / "killed", "resume")
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out

    a = torch.load(tmp_path / "uninterrupted" / "model.pt", weights_only=False)["state_dict"]
    b = torch.load(tmp_path / "killed" / "model.pt", weights_only=False)["state_dict"]
    assert a.keys() == b.keys()
    different = [k for k in a if isinstance(a[k], torch.Tensor) and not torch.equal(a[k], b[k])]
    assert not different, f"resumed run (killed at {killed_at}) differs in {different[:5]}"
    ha = [json.loads(x) for x in (tmp_path / "uninterrupted" / "metrics.jsonl").read_text().splitlines()]
    hb = [json.loads(x) for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"], r["loss"]) for r in ha] == [(r["stage"], r["step"], r["loss"]) for r in hb]


def test_public_entry_points():
    assert pyimputmae.train is train and pyimputmae.load is load


@pytest.mark.parametrize("world", ["2", "8"])
def test_a_distributed_launch_is_refused_before_anything_is_written(tmp_path, cohort, monkeypatch, world):
    """Under torchrun each of WORLD_SIZE processes would train the whole cohort into the same out_dir."""
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "1")
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=rf"process 1 of {world} of a distributed launch.*'{re.escape(str(out))}'"
                                          r".*--nproc_per_node=1"):
        train(cohort=cohort, model=TINY, out_dir=str(out), **FAST)
    assert not out.exists()
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not a whole number"):
        train(cohort=cohort, model=TINY, out_dir=str(out), **FAST)
    monkeypatch.setenv("WORLD_SIZE", "1")  # a world of one process trains as usual
    res = train(cohort=cohort, model=TINY, out_dir=str(out), **FAST)
    assert Path(res.paths["model"]).is_file()


def test_a_cohort_of_other_sizes_is_refused_with_a_model_setting_that_trains(tmp_path):
    """The suggested --set model.modalities=... takes the cohort's sizes and a patch that divides them."""
    shapes = {**TINY_SHAPES, "rna": (1, 200)}  # e.g. a store written with another --rna-width
    cohort = make_cohort(n_patients=48, shapes=shapes, seed=1)
    with pytest.raises(ValueError, match=r"modality 'rna': an in-memory cohort holds inputs of shape \(1, 200\) per "
                                         r"patient, the model expects \(1, 1024\) \(patch 64\): configure the model "
                                         r"for the data, e.g. --set model.modalities='") as err:
        train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "a"), **FAST)
    suggested = json.loads(str(err.value).split("model.modalities='")[1].split("'")[0])
    assert suggested[0] == {"name": "rna", "channels": 1, "spatial": [200], "patch": 50, "depth": 2}
    assert suggested[1:] == TINY.to_dict()["modalities"][1:]  # the others already fit: unchanged
    res = train(cohort=cohort, model=TINY, model_overrides={"modalities": suggested}, out_dir=str(tmp_path / "b"),
                **FAST)
    assert res.model.config.modalities[0].patch == 50 and np.isfinite(res.metrics["test"]["c_index"])


def test_a_runs_config_json_repeats_the_run_without_its_overwrite(tmp_path, cohort):
    first = train(cohort=cohort, model=TINY, out_dir=str(tmp_path / "a"), overwrite=True, **FAST)
    cfg = TrainConfig.load(first.paths["config"], out_dir=str(tmp_path / "b"))
    assert (cfg.overwrite, cfg.resume, cfg.pretrain_epochs, cfg.seed) == (False, False, 2, 0)
    again = train(cfg, cohort=cohort)
    assert again.metrics["test"] == first.metrics["test"]  # same settings, same seed, same cohort (CPU)
    with pytest.raises(FileExistsError, match="already holds a training run"):  # overwrite=True was not carried
        train(TrainConfig.load(first.paths["config"]), cohort=cohort)

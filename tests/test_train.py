"""pyimputmae.train(): pre-train → fine-tune → evaluate, checkpoints, kill-and-resume, load, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import pyimputmae
from pyimputmae.data.synthetic import make_cohort
from pyimputmae.model.config import ModelConfig
from pyimputmae.training import TrainConfig, load, predict_survival, train

TINY = ModelConfig.small(dim=32, heads=2, mlp=64, decoder_dim=32, decoder_heads=2, decoder_mlp=64, freeze="none")
TINY_SHAPES = {m.name: m.shape for m in TINY.modalities}
FAST = {"pretrain_epochs": 2, "finetune_epochs": 2, "pretrain_batch_size": 32, "finetune_batch_size": 32,
        "progress": False, "log_every": 1}


@pytest.fixture(scope="module")
def cohort():
    return make_cohort(n_patients=96, shapes=TINY_SHAPES, seed=3)


def test_train_pretrains_finetunes_and_writes_everything(tmp_path, cohort):
    res = train(cohort=cohort, model=TINY, out_dir=str(tmp_path), checkpoint_every=2, **FAST)
    for key in ("model", "metrics", "history", "checkpoint", "config"):
        assert Path(res.paths[key]).exists(), key
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
    with pytest.raises(ValueError, match="nothing to do"):
        TrainConfig.load(pretrain=False, finetune=False)


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
    with pytest.raises(ValueError, match=r"modality 'mri': the cohort holds inputs of shape \(1, 16, 16, 16\)"):
        train(cohort=wrong, model=TINY, out_dir=str(tmp_path), **FAST)
    with pytest.raises(ValueError, match="spatial size 1000 .* not a positive multiple of its patch size 64"):
        ModelConfig.small(modalities=({"name": "rna", "channels": 1, "spatial": (1000,), "patch": 64, "depth": 1},))
    from pyimputmae.model.mae import ImputeMAE, new_rng

    batch = cohort.batch(np.arange(4))
    batch.present = torch.zeros_like(batch.present)
    with pytest.raises(ValueError, match="no patient in this batch has any of the modalities rna, dnam, wsi, mri"):
        ImputeMAE(TINY).forward_pretrain(batch, new_rng(0))


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

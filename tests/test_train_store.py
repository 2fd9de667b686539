"""train(data=STORE) on a store written by `pyimputmae preprocess` with its defaults: the model takes
the store's clinical columns, a YAML/CLI configuration changes one model setting, and a resume
recognises the store by its content (a moved store resumes, another one does not)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pyimputmae.cli import main
from pyimputmae.training import load, train

pytest.importorskip("zarr", reason="zarr>=3 writes the store")

# the small model's RNA input (1×1024), one block, narrow: a few seconds on CPU
RNA_ONLY = {"modalities": [{"name": "rna", "channels": 1, "spatial": [1024], "patch": 64, "depth": 1}],
            "dim": 32, "heads": 2, "mlp": 64, "decoder_dim": 32, "decoder_heads": 2, "decoder_mlp": 64,
            "decoder_depth": 1, "fusion_heads": 2, "freeze": "none"}
FAST = {"pretrain_epochs": 1, "finetune_epochs": 1, "pretrain_batch_size": 16, "finetune_batch_size": 16,
        "progress": False}


def _make_store(d: Path, seed: int) -> Path:
    """40 patients, RNA from a samples × genes table; manifest columns project and age_years, which
    `preprocess` encodes by default as clinical columns project=LGG, age_years."""
    from pyimputmae.data.preprocess import preprocess

    rs = np.random.default_rng(seed)
    n = 40
    ids = [f"P{i:03d}" for i in range(n)]
    d.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rs.normal(size=(n, 1100)) + 3, index=ids, columns=[f"G{j}" for j in range(1100)]).to_csv(d / "rna.csv")
    pd.DataFrame({"patient_id": ids, "time": rs.uniform(0.1, 5, n), "event": (rs.random(n) < 0.6).astype(int),
                  "split": ["train"] * 30 + ["test"] * 10, "fold": [str(i % 3) for i in range(30)] + [""] * 10,
                  "project": rs.choice(["LGG", "GBM"], n), "age_years": rs.uniform(20, 80, n).round(1),
                  "rna": "rna.csv"}).to_csv(d / "manifest.csv", index=False)
    preprocess(d / "manifest.csv", d / "cohort.zarr", config={"modalities": ["rna"], "rna": {
        "width": 1024, "log1p": False, "kind": "table"}}, progress=False, verbose=False)
    return d / "cohort.zarr"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make_store(tmp_path_factory.mktemp("store"), seed=0)


def test_a_named_model_takes_the_clinical_columns_of_the_store(store, tmp_path):
    res = train(model="small", model_overrides=RNA_ONLY, data=str(store), out_dir=str(tmp_path / "run"), **FAST)
    assert res.model.config.clinical_features == ("project=LGG", "age_years")
    assert load(res.paths["model"]).config.clinical_features == ("project=LGG", "age_years")
    assert np.isfinite(res.metrics["test"]["c_index"])


def test_a_store_without_some_of_the_models_modalities_is_refused_with_the_setting_that_fits(store, tmp_path, capsys):
    from pyimputmae.model.config import ModelConfig

    args = ["train", "--data", str(store), "--out", str(tmp_path / "run"), "--set", "model=small", "progress=false"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"pyimputmae train: error: the model expects modalities 'dnam', 'wsi', 'mri' but {store} has "
                          "['rna']: configure the model with the cohort's modalities only, e.g. --set "
                          "model.modalities='"), err
    suggested = json.loads(err.split("model.modalities='")[1].split("'")[0])
    assert suggested == [m for m in ModelConfig.small().to_dict()["modalities"] if m["name"] == "rna"]
    assert not (tmp_path / "run").exists()


def test_yaml_with_one_model_setting_from_the_command_line(store, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: small\nmodel_overrides: {RNA_ONLY}\ndata: {store}\nout_dir: {tmp_path / 'run'}\n"
                      "pretrain_epochs: 1\nfinetune_epochs: 1\npretrain_lr: 1e-3\nprogress: false\n")
    assert main(["train", "--config", str(config), "--set", 'model.clinical_features=["age"]']) == 1
    assert re.search(r"^pyimputmae train: error: the configured clinical_features \['age'\] differ from the clinical "
                     r"columns of the cohort \(.*cohort.zarr\) \['project=LGG', 'age_years'\]"
                     r".*--clinical age` \(manifest column names\)", capsys.readouterr().err)
    assert not (tmp_path / "run").exists()  # refused before training
    assert main(["train", "--config", str(config), "--set", 'model.clinical_features=["project=LGG", "age_years"]',
                 "model.clinical_mode=concat"]) == 0
    model = load(tmp_path / "run" / "model.pt")
    assert model.config.clinical_features == ("project=LGG", "age_years") and model.config.clinical_mode == "concat"


def test_resume_recognises_the_store_by_its_content(store, tmp_path):
    run = {"model": "small", "model_overrides": RNA_ONLY, "out_dir": str(tmp_path / "run"), **FAST}
    first = train(data=str(store), **run)
    moved = tmp_path / "moved.zarr"
    shutil.copytree(store, moved)
    again = train(data=str(moved), resume=True, **{**run, "finetune_epochs": 2})
    assert len(again.history) > len(first.history)
    other = _make_store(tmp_path / "other", seed=1)
    with pytest.raises(ValueError, match=r"(?s)cannot resume from .*cohort: 40 patients \(train 30, test 10\) from "
                                         r".*moved.zarr in the checkpoint, 40 patients \(train 30, test 10\) from "
                                         r".*other/cohort.zarr now \(same size, different content\)"):
        train(data=str(other), resume=True, **{**run, "finetune_epochs": 2})


def test_a_pretrained_only_model_carries_the_preprocessing_impute_checks(store, tmp_path):
    """A model saved after pre-training alone (finetune=False) records the store's fitted
    preprocessing, so `pyimputmae impute` can refuse a store made another way."""
    from pyimputmae.data.store import load_cohort
    from pyimputmae.inference import check_compatible

    res = train(model="small", model_overrides=RNA_ONLY, data=str(store), out_dir=str(tmp_path / "run"),
                **{**FAST, "finetune": False})
    mae = load(res.paths["model"])
    cohort = load_cohort(store)
    assert mae.preprocessing["preprocessing"] == cohort.attrs["preprocessing"]
    # a model file can be shared: it keeps no patient id of the training cohort
    assert "ids" not in mae.preprocessing and "failures" not in mae.preprocessing["report"]
    assert not any(str(i) in json.dumps(mae.preprocessing) for i in cohort.ids)
    assert check_compatible(mae, cohort, clinical=False) == []
    cohort.attrs["preprocessing"] = {**cohort.attrs["preprocessing"], "config": {"rna": {"width": 7}}}
    with pytest.raises(ValueError, match="its preprocessing differs from the one the model was trained with"):
        check_compatible(mae, cohort, clinical=False)

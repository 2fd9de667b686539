"""Using a trained model on a store: `predict` / `impute` check that the store fits the model
(clinical columns, preprocessing), clinical-only patients, damaged model files, and the command
line's one-line errors and exit status."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pyimputmae.cli import main
from pyimputmae.data.preprocess import preprocess
from pyimputmae.data.store import load_cohort
from pyimputmae.inference import (
    PreprocessingWarning,
    check_compatible,
    impute,
    load,
    predict_survival,
    save_model,
)
from pyimputmae.model import ImputeMAE, ModelConfig, SurvivalModel

pytest.importorskip("zarr", reason="zarr>=3 writes the store")

N, PROBES = 80, [f"cg{j:04d}" for j in range(12)]
CLINICAL = ["radiation", "chemo", "age"]
STORE_CONFIG = {"modalities": ["dnam"], "dnam": {"width": 16}, "clinical_columns": CLINICAL}
MODEL = ModelConfig.small(
    modalities=({"name": "dnam", "channels": 1, "spatial": (16,), "patch": 4, "depth": 1},),
    dim=32, heads=2, mlp=64, decoder_dim=32, decoder_heads=2, decoder_mlp=64, decoder_depth=1, freeze="none")


def _manifest(folder: Path, name: str, seed: int, split: list[str], clinical_only: set[int]) -> Path:
    """``N`` patients with a methylation table; ``clinical_only`` rows have no omics."""
    rng = np.random.default_rng(seed)
    ids = [f"S{seed}-{i:03d}" for i in range(N)]
    pd.DataFrame(rng.random((N, len(PROBES))), index=ids, columns=PROBES).to_csv(folder / f"{name}.tsv", sep="\t")
    table = pd.DataFrame({
        "patient_id": ids, "time": rng.exponential(2.0, N).round(3), "event": rng.integers(0, 2, N), "split": split,
        "radiation": rng.choice(["yes", "no"], N), "chemo": rng.choice(["yes", "no"], N),
        "age": rng.integers(20, 80, N),
        "dnam": ["" if i in clinical_only else f"{name}.tsv" for i in range(N)],
    })
    path = folder / f"{name}.csv"
    table.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A training store and a model fitted on it; new patients' stores: with --fitted (every test
    patient has clinical data only), with the clinical columns in another order, with another
    methylation scale, and preprocessed on their own with the same settings."""
    d = tmp_path_factory.mktemp("inference")
    split = ["train"] * 60 + ["test"] * 20
    train_csv = _manifest(d, "train", 0, split, clinical_only={3, 17, 40})
    new_csv = _manifest(d, "new", 1, split, clinical_only=set(range(60, 80)) | {5})
    run = {"workers": 0, "progress": False, "verbose": False}
    preprocess(train_csv, d / "train.zarr", config=STORE_CONFIG, **run)
    preprocess(new_csv, d / "fitted.zarr", fitted=d / "train.zarr", **run)
    preprocess(new_csv, d / "m_value.zarr", config={**STORE_CONFIG, "dnam": {"width": 16, "values": "m_value"}},
               **run)
    preprocess(new_csv, d / "own.zarr", config=STORE_CONFIG, **run)
    assert main(["preprocess", str(new_csv), "--out", str(d / "reordered.zarr"), "--modalities", "dnam",
                 "--dnam-width", "16", "--clinical", "age,chemo,radiation", "--workers", "0", "--no-progress"]) == 0
    torch.manual_seed(0)
    model = SurvivalModel(ImputeMAE(MODEL), MODEL).fit_preprocessing(load_cohort(d / "train.zarr"))
    save_model(model, d / "model.pt")
    save_model(model.mae, d / "pretrained.pt")
    return {"dir": d, "model": d / "model.pt", "pretrained": d / "pretrained.pt",
            **{name: d / f"{name}.zarr" for name in ("train", "fitted", "m_value", "own", "reordered")}}


# ------------------------------------------------------------------------ the store must fit the model
def test_a_store_made_with_fitted_predicts_and_imputes(setup, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(setup["model"]), "--data", str(setup["fitted"]), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert len(table) == N and np.isfinite(table["risk"]).all()  # clinical-only patients are predicted too
    assert "warning" not in capsys.readouterr().err


def test_predict_plots_the_risk_groups_of_patients_with_known_survival(setup, tmp_path, capsys):
    """An external validation cohort: ``--plot`` draws Kaplan–Meier curves of the predicted risk halves."""
    out, png = tmp_path / "p.csv", tmp_path / "groups.png"
    args = ["predict", "--model", str(setup["model"]), "--data", str(setup["fitted"]), "--out", str(out)]
    assert main([*args, "--split", "test", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"wrote {png}: 20 patients with known survival, "
                                                              "log-rank p = ")
    cohort = load_cohort(setup["fitted"])
    cohort.time[:] = float("nan")  # new patients without follow-up: nothing to draw, said so
    from pyimputmae import cli

    class Args:
        split, plot = "all", str(tmp_path / "none.png")

    with pytest.raises(ValueError, match=r"--plot needs patients whose survival the store records: 0 of 80 have a "
                                         r"time and event, with 0 deaths"):
        cli._plot_outcomes(Args(), load(setup["model"]), cohort, np.arange(N))
    assert not (tmp_path / "none.png").exists()


def test_clinical_columns_in_another_order_are_refused(setup, tmp_path, capsys):
    out = tmp_path / "p.csv"
    rc = main(["predict", "--model", str(setup["model"]), "--data", str(setup["reordered"]), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and not out.exists()
    assert f"pyimputmae predict: error: store {setup['reordered']} does not fit model {setup['model']}" in err
    assert ("clinical columns ['age', 'chemo', 'radiation'] differ from the ones the model was trained with "
            "['radiation', 'chemo', 'age'] (the same columns in another order)") in err
    assert f"--fitted {setup['train']}" in err and "Traceback" not in err
    # the Python API refuses it too
    model, cohort = load(setup["model"]), load_cohort(setup["reordered"])
    with pytest.raises(ValueError, match=r"clinical columns \['age', 'chemo', 'radiation'\] differ"):
        predict_survival(model, cohort)
    renamed = load_cohort(setup["fitted"])
    renamed.clinical_names = ["radiation", "chemo", "age_years"]
    with pytest.raises(ValueError, match=r"missing 'age'; not known to the model 'age_years'"):
        check_compatible(model, renamed)


def test_another_preprocessing_is_refused_and_names_the_difference(setup, tmp_path, capsys):
    for command, out in (("predict", tmp_path / "p.csv"), ("impute", tmp_path / "i.npz")):
        rc = main([command, "--model", str(setup["model"]), "--data", str(setup["m_value"]), "--out", str(out)])
        err = capsys.readouterr().err
        assert rc == 1 and not out.exists()
        assert "its preprocessing differs from the one the model was trained with" in err
        assert 'config.dnam.values: "beta" for the model, "m_value" in the store' in err
        assert "--fitted" in err
    with pytest.raises(ValueError, match="config.dnam.values"):
        impute(load(setup["model"]), load_cohort(setup["m_value"]))
    both = load_cohort(setup["m_value"])
    both.clinical_names = ["age", "chemo", "radiation"]
    with pytest.raises(ValueError, match=r"\(1\) clinical columns .*; \(2\) its preprocessing differs .*dnam.values"):
        check_compatible(load(setup["model"]), both)


def test_other_training_statistics_are_a_warning(setup, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main(["predict", "--model", str(setup["model"]), "--data", str(setup["own"]), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "pyimputmae predict: warning: the store's preprocessing was fitted on other training patients" in err
    assert "dnam.medians" in err
    with pytest.warns(PreprocessingWarning, match="dnam.medians"):
        predict_survival(load(setup["model"]), load_cohort(setup["own"]))


# ------------------------------------------------------------------------------- clinical-only patients
@pytest.mark.parametrize("split", ["test", "all"])
def test_impute_skips_clinical_only_patients_and_writes_the_rest(setup, tmp_path, capsys, split):
    out = tmp_path / "i.npz"
    assert main(["impute", "--model", str(setup["model"]), "--data", str(setup["fitted"]), "--out", str(out),
                 "--split", split]) == 0
    printed = capsys.readouterr().out
    cohort = load_cohort(setup["fitted"])
    rows = cohort.indices("test") if split == "test" else np.arange(N)
    no_data = ~cohort.present[rows].numpy().any(1)
    with np.load(out) as z:
        assert z["dnam"].shape == (len(rows), 1, 16) and list(z["patient_id"]) == [cohort.ids[i] for i in rows]
        assert np.isnan(z["dnam"][no_data]).all() and np.isfinite(z["dnam"][~no_data]).all()
        np.testing.assert_array_equal(z["dnam"][~no_data], cohort.inputs["dnam"][rows][~no_data].numpy())
    assert f"for {int((~no_data).sum())} of {len(rows)} patients" in printed
    assert f"{int(no_data.sum())} patients have clinical data only ({cohort.ids[rows[no_data][0]]}" in printed


def test_impute_names_the_file_it_writes_when_numpy_adds_the_npz_suffix(setup, tmp_path, capsys):
    out = tmp_path / "imputed"
    assert main(["impute", "--model", str(setup["model"]), "--data", str(setup["fitted"]), "--out", str(out)]) == 0
    assert f"patients to {out}.npz (arrays dnam;" in capsys.readouterr().out
    assert (tmp_path / "imputed.npz").is_file() and not out.exists()


def test_predict_and_impute_replace_their_output_whole(setup, tmp_path, monkeypatch, capsys):
    """An output is written to a temporary and renamed over the target: a run stopped while writing
    (killed, or a full disk as here, where the rename fails) leaves the earlier file as it was and
    no temporary, never a CSV cut short that reads as fewer patients."""
    data = ["--model", str(setup["model"]), "--data", str(setup["fitted"])]
    csv, npz = tmp_path / "p.csv", tmp_path / "i.npz"
    csv.write_text("earlier\n")
    npz.write_bytes(b"earlier")

    def disk_full(*args):
        raise OSError(28, "No space left on device", str(args[-1]))

    monkeypatch.setattr(os, "replace", disk_full)
    assert main(["predict", *data, "--out", str(csv)]) == 1
    assert main(["impute", *data, "--out", str(npz)]) == 1
    assert f"{csv}: No space left on device" in capsys.readouterr().err
    assert csv.read_text() == "earlier\n" and npz.read_bytes() == b"earlier"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.npz", "p.csv"]


def test_impute_of_a_norm_pix_model_writes_one_unit_and_says_which(setup, tmp_path, capsys):
    """norm_pix: the observed values are written normalised per patch like the reconstructions (they
    used to be raw beside normalised reconstructions in one array), and the command says so."""
    from pyimputmae.model import normalized_inputs

    torch.manual_seed(0)
    cfg = MODEL.replace(norm_pix=True)
    path = save_model(SurvivalModel(ImputeMAE(cfg), cfg).fit_preprocessing(load_cohort(setup["train"])),
                      tmp_path / "norm_pix.pt")
    out = tmp_path / "i.npz"
    assert main(["impute", "--model", str(path), "--data", str(setup["train"]), "--out", str(out)]) == 0
    assert "pre-trained with norm_pix: every value written, observed ones included, is normalised per patch" in (
        capsys.readouterr().out)
    cohort = load_cohort(setup["train"])
    has = cohort.present[:, 0].numpy()
    with np.load(out) as z:
        np.testing.assert_allclose(z["dnam"][has], normalized_inputs(cohort.inputs["dnam"][has], 4).numpy(),
                                   rtol=1e-6, atol=1e-6)


def test_impute_api_with_a_pretrained_model(setup):
    cohort = load_cohort(setup["fitted"])
    out = impute(load(setup["pretrained"]), cohort, cohort.indices("test"))
    assert out["dnam"].shape == (20, 1, 16) and np.isnan(out["dnam"]).all()  # every test patient: clinical only
    out = impute(load(setup["model"]), cohort, batch_size=7)
    has = cohort.present.numpy().any(1)
    assert np.isnan(out["dnam"][~has]).all() and np.isfinite(out["dnam"][has]).all()


def test_predict_with_a_pretrained_model_says_fine_tune_first(setup, tmp_path, capsys):
    rc = main(["predict", "--model", str(setup["pretrained"]), "--data", str(setup["fitted"]),
               "--out", str(tmp_path / "p.csv")])
    assert rc == 1 and "without a survival head: fine-tune it first" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- model files
def test_files_that_are_not_models_are_named(setup, tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("garbage\n")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(setup["model"].read_bytes()[:2000])
    for size in (5000, 50000):  # cut further in, torch's zip reader raises OSError(EINVAL)
        cut = tmp_path / f"cut{size}.pt"
        cut.write_bytes(setup["model"].read_bytes()[:size])
        with pytest.raises(ValueError, match=f"{cut} is not a pyimputmae model file \\(damaged or truncated"):
            load(cut)
    foreign = tmp_path / "weights.pt"
    torch.save({"weight": torch.zeros(2)}, foreign)
    cases = {text: "not written by torch.save: it begins with b'garb'", empty: "it is empty",
             truncated: "damaged or truncated", foreign: "without the 'format': 'pyimputmae-model' entry"}
    for path, why in cases.items():
        with pytest.raises(ValueError, match=f"{path} is not a pyimputmae model file") as info:
            load(path)
        assert why in str(info.value)
        rc = main(["predict", "--model", str(path), "--data", str(setup["fitted"]), "--out", str(tmp_path / "p.csv")])
        err = capsys.readouterr().err
        assert rc == 1 and f"pyimputmae predict: error: {path} is not a pyimputmae model file" in err, err
    with pytest.raises(IsADirectoryError, match=r"is a folder, not a model file \(pass the model.pt inside it\)"):
        load(setup["dir"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_loading_onto_a_gpu_that_is_not_there_names_the_device(setup):
    # torch's own error came from deep inside Module.to ("Found no NVIDIA driver ...")
    with pytest.raises(ValueError, match=r"device='cuda' but no CUDA GPU is visible to PyTorch .* use device='cpu'"):
        load(setup["model"], device="cuda")
    assert next(load(setup["model"], device="auto").parameters()).device.type == "cpu"


def _flip_a_byte_of_the_largest_tensor(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target`` with one byte changed in the middle of its largest stored tensor
    (what a bad copy does); → that member's name."""
    data = bytearray(source.read_bytes())
    with zipfile.ZipFile(source) as archive:
        info = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    data[info.header_offset + 30 + name_len + extra_len + info.file_size // 2] ^= 0x10
    target.write_bytes(bytes(data))
    return info.filename


def test_a_model_file_with_a_changed_byte_is_refused_not_loaded_with_other_weights(setup, tmp_path, capsys):
    # torch.load does not check the archive's checksums: such a file used to load and predict other numbers
    damaged = tmp_path / "damaged.pt"
    member = _flip_a_byte_of_the_largest_tensor(setup["model"], damaged)
    with pytest.raises(ValueError, match=f"{damaged} is a damaged model file: the bytes of '{member}' inside it do "
                                         "not match the checksum written with them .* Copy it again"):
        load(damaged)
    rc = main(["predict", "--model", str(damaged), "--data", str(setup["fitted"]), "--out", str(tmp_path / "p.csv")])
    assert rc == 1 and f"{damaged} is a damaged model file" in capsys.readouterr().err
    # a file written without checksums (torch's compute_crc32 off) has nothing to check and still loads
    config = pytest.importorskip("torch.utils.serialization").config.save
    state = torch.load(setup["model"], weights_only=False)
    unchecked = tmp_path / "unchecked.pt"
    before, config.compute_crc32 = config.compute_crc32, False
    try:
        torch.save(state, unchecked)
    finally:
        config.compute_crc32 = before
    with zipfile.ZipFile(unchecked) as archive:
        assert {i.CRC for i in archive.infolist()} == {0}
    cohort = load_cohort(setup["fitted"])
    np.testing.assert_array_equal(predict_survival(load(unchecked), cohort), predict_survival(load(setup["model"]),
                                                                                              cohort))


# ------------------------------------------------------------------------------- command-line errors
def test_expected_errors_are_one_line_unless_traceback_is_asked(setup, tmp_path, capsys, monkeypatch):
    argv = ["predict", "--model", str(tmp_path / "missing.pt"), "--data", str(setup["fitted"]),
            "--out", str(tmp_path / "p.csv")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.strip() == f"pyimputmae predict: error: model file {tmp_path / 'missing.pt'} does not exist"
    assert main([*argv, "--traceback"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.rstrip().endswith("does not exist")
    monkeypatch.setenv("PYIMPUTMAE_TRACEBACK", "1")
    assert main(argv) == 1 and "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("PYIMPUTMAE_TRACEBACK")
    rc = main(["predict", "--model", str(setup["model"]), "--data", str(tmp_path / "nowhere.zarr"),
               "--out", str(tmp_path / "p.csv")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("pyimputmae predict: error: ") and "nowhere.zarr is not a zarr store" in err
    # a device that is not there, an output folder that does not exist: bad settings, not bugs
    model_args = ["--model", str(setup["model"]), "--data", str(setup["fitted"])]
    bad = [(["--device", "gpu", "--out", str(tmp_path / "p.csv")], "device must be 'auto'"),
           (["--out", str(tmp_path / "no" / "such" / "folder" / "p.csv")], "")]
    if not torch.cuda.is_available():
        bad.append((["--device", "cuda", "--out", str(tmp_path / "p.csv")], "no CUDA GPU is visible"))
    for extra, message in bad:
        assert main(["predict", *model_args, *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("pyimputmae predict: error: ") and message in err and "Traceback" not in err, err


def test_a_bug_still_shows_its_traceback_and_ctrl_c_is_quiet(monkeypatch, capsys):
    import pyimputmae.info

    def bug(as_json: bool = False) -> None:
        raise KeyError("oops")

    monkeypatch.setattr(pyimputmae.info, "main", bug)
    assert main(["info"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "internal error (KeyError" in err and "a bug" in err

    def interrupted(as_json: bool = False) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(pyimputmae.info, "main", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "pyimputmae info: interrupted"


def test_exit_status_from_the_shell(tmp_path):
    """As a user sees it: one line on stderr, status 1; a bad flag is argparse's status 2."""
    missing = subprocess.run([sys.executable, "-m", "pyimputmae", "predict", "--model", str(tmp_path / "m.pt"),
                              "--data", "x.zarr", "--out", "p.csv"], capture_output=True, text=True, timeout=120)
    assert missing.returncode == 1 and missing.stderr.strip().endswith(f"model file {tmp_path / 'm.pt'} does not exist")
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    usage = subprocess.run([sys.executable, "-m", "pyimputmae", "predict", "--bogus"], capture_output=True, text=True,
                           timeout=120)
    assert usage.returncode == 2

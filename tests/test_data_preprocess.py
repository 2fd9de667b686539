"""``preprocess``: manifest → zarr v3 store with bad inputs among good ones; the store's layout,
provenance and report; loading (whole cohort and per patient); resuming after a crash; reusing the
fitted preprocessing for new patients; the command line with a process pool."""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from test_data_common import (
    GDC_HEADER,
    GENES,
    SLIDE,
    crash_on_p2,
    need,
    stained_section,
    write_gdc_star,
    write_mni_case,
    write_tiled_tiff,
)

import pyimputmae
from pyimputmae.data import preprocess as pp
from pyimputmae.data.manifest import ManifestError, ManifestWarning, read_manifest
from pyimputmae.data.store import (
    StoreDataset,
    StoreError,
    completed_patients,
    draw_wsi_tiles,
    load_cohort,
    load_preprocessing,
    load_wsi_bank,
    make_dataloader,
    open_store,
)

pytest.importorskip("zarr", reason="zarr>=3 writes the store")
pytest.importorskip("openslide", reason="openslide-python + openslide-bin read the slides")
pytest.importorskip("SimpleITK", reason="SimpleITK reads the MRI")

CONFIG = {
    "rna": {"min_std": 0.0, "width": 32},
    "dnam": {"width": 16},
    "wsi": {"tile_px": 32, "mpp": 2.0, "n_candidates": 6, "n_keep": 3},
    "mri": {"sequences": ["t1ce"], "spacing": 4.0, "crop": [16, 16, 16]},
}
IDS = ["P0", "P1", "P2", "P3", "P4", "P5"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six patients and one duplicated id. RNA: GDC STAR files (P3's lacks the gene_name column);
    DNAm: one samples × probes table; slides: the real one for P0 and P2, a truncated copy for P4;
    MRI: the MNI case for P1 and P2, a 2-D NIfTI for P3."""
    slide = need(SLIDE, "the real Aperio slide cmu_small_region.svs")
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for pid in IDS[:5]:
        cols = tuple(c for c in GDC_HEADER if c != "gene_name") if pid == "P3" else GDC_HEADER
        write_gdc_star(d / f"{pid}.star.tsv", GENES, list(rng.gamma(2.0, 10.0, len(GENES))), columns=cols)
    pd.DataFrame(rng.random((6, 10)), index=IDS, columns=[f"cg{j:04d}" for j in range(10)]).to_csv(
        d / "beta.tsv", sep="\t")
    (d / "broken.svs").write_bytes(slide.read_bytes()[:300_000])
    case = write_mni_case(d / "mri_case", sequences=("t1ce",))
    import nibabel as nib

    img = nib.load(case["t1ce"])
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj)[:, :, 40], img.affine), d / "slice.nii.gz")
    rows = [
        # id, time, event, split, fold, age, radiation, rna, dnam, wsi, mri
        ("P0", 1.5, 1, "train", 0, 40, "yes", "P0.star.tsv", "beta.tsv", str(slide), ""),
        ("P1", 3.0, 0, "train", 1, 55, "no", "P1.star.tsv", "beta.tsv", "", "mri_case"),
        ("P2", 0.7, 1, "train", 0, "", "yes", "P2.star.tsv", "beta.tsv", str(slide), "mri_case"),
        ("P3", 2.2, 0, "train", 1, 61, "", "P3.star.tsv", "beta.tsv", "", "slice.nii.gz"),
        ("PDUP", 1.0, 1, "train", 0, 50, "no", "", "", "", ""),
        ("P4", 4.0, 1, "test", "", 70, "no", "P4.star.tsv", "beta.tsv", "broken.svs", ""),
        ("P5", 0.2, 0, "test", "", 33, "yes", "", "beta.tsv", "", ""),
        ("PDUP", 2.0, 0, "test", "", 51, "no", "", "", "", ""),
    ]
    cols = ["patient_id", "time", "event", "split", "fold", "age", "radiation", "rna", "dnam", "wsi", "mri"]
    pd.DataFrame(rows, columns=cols).to_csv(d / "manifest.csv", index=False)
    (d / "config.json").write_text(json.dumps(CONFIG))
    return d


def run(inputs: Path, out: Path, **kw) -> pp.PreprocessReport:
    kw.setdefault("workers", 0)
    with pytest.warns(ManifestWarning, match="PDUP.*duplicate"):
        return pp.preprocess(inputs / "manifest.csv", out, config=CONFIG, progress=False, verbose=False, **kw)


@pytest.fixture(scope="module")
def store(inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("store") / "cohort.zarr"
    run(inputs, out)
    return out


def arrays(path: Path) -> dict[str, np.ndarray]:
    root = open_store(path)
    names = ["rna/data", "dnam/data", "wsi/tiles", "wsi/scores", "wsi/count", "mri/data", "mri/center",
             "table/present", "table/status", "table/clinical", "table/time"]
    return {n: root[n][:] for n in names}


def assert_same_store(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    for name in x:
        np.testing.assert_array_equal(x[name], y[name], err_msg=name)


def test_bad_inputs_are_reported_and_the_rest_is_processed(store: Path):
    report = pp.PreprocessReport.from_dict(open_store(store).attrs["report"])
    assert report.n_patients == 6 and report.counts == {
        "rna": {"listed": 5, "present": 4, "missing": 1, "failed": 1},
        "dnam": {"listed": 6, "present": 6, "missing": 0, "failed": 0},
        "wsi": {"listed": 3, "present": 2, "missing": 3, "failed": 1},
        "mri": {"listed": 3, "present": 2, "missing": 3, "failed": 1},
    }
    failures = {(p, m): e for p, m, e in report.failures}
    assert set(failures) == {("P3", "rna"), ("P3", "mri"), ("P4", "wsi")}
    assert "P3.star.tsv (patient 'P3'): GDC STAR counts file has no column(s) ['gene_name']" in failures["P3", "rna"]
    assert "slice.nii.gz (patient 'P3') [t1ce]: expected a 3-D volume, got a 2-D image" in failures["P3", "mri"]
    assert "broken.svs (patient 'P4'): not a slide OpenSlide can read" in failures["P4", "wsi"]
    assert any("PDUP" in r and "duplicate" in r for r in report.rejected)
    text = report.table()
    assert "\nwsi             3        2        3       1\n" in text and "failures (3):" in text


def test_store_layout_and_provenance(store: Path, inputs: Path):
    root = open_store(store)
    attrs = root.attrs.asdict()
    assert attrs["complete"] and attrs["ids"] == IDS and attrs["modalities"] == ["rna", "dnam", "wsi", "mri"]
    assert attrs["package_version"] == pyimputmae.__version__ and attrs["codec"] == "lz4"
    prov = attrs["provenance"]
    assert prov["manifest"] == str(inputs / "manifest.csv") and len(prov["manifest_sha256"]) == 64
    assert prov["config"]["wsi"]["tile_px"] == 32
    assert root["mri/data"].chunks == (1, 1, 16, 16, 16) and root["wsi/tiles"].chunks == (1, 1, 3, 32, 32)
    assert root["wsi/tiles"].shape == (6, 3, 3, 32, 32) and root["rna/data"].shape == (6, 1, 32)
    sources = root["provenance"].attrs["sources"]
    assert sources["wsi"][0]["file"]["path"] == str(SLIDE)
    assert sources["wsi"][0]["file"]["checksum"].startswith("sha256:")
    resolution = sources["wsi"][0]["resolution"]  # the µm/px it was tiled at, and where that came from
    assert resolution["from"] == "file"
    assert resolution["slide_mpp"] == resolution["recorded_mpp"] == pytest.approx(0.499)
    assert sources["mri"][1]["t1ce"]["path"].endswith("case_t1ce.nii.gz")
    assert sources["rna"][0]["checksum"].startswith("sha256:") and sources["rna"][3] is None
    fitted = load_preprocessing(store)
    assert json.loads(json.dumps(fitted)) == fitted  # a plain dict
    assert fitted["rna"]["features"][0] == "ENSG00000000003" and len(fitted["rna"]["medians"]) == 11
    assert [f["name"] for f in fitted["clinical"]["features"]] == ["age", "radiation"]
    assert not (store / "_progress").exists()  # the journal is gone once complete


def test_load_cohort(store: Path):
    c = load_cohort(store)
    assert c.ids == IDS and c.modalities == ("rna", "dnam", "wsi", "mri")
    assert c.inputs["wsi"].shape == (6, 3, 32, 32) and c.inputs["mri"].shape == (6, 1, 16, 16, 16)
    expected = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1], [1, 1, 1, 1], [0, 1, 0, 0], [1, 1, 0, 0], [0, 1, 0, 0]],
                            dtype=torch.bool)
    assert torch.equal(c.present, expected)
    for m, j in (("rna", 0), ("wsi", 2), ("mri", 3)):
        assert (c.inputs[m][~c.present[:, j]] == 0).all()  # missing and failed rows are zeros
        assert all(c.inputs[m][i].abs().sum() > 0 for i in torch.nonzero(c.present[:, j]).flatten())
    assert 0 <= c.inputs["wsi"].min() and c.inputs["wsi"].max() <= 1
    torch.testing.assert_close(c.time, torch.tensor([1.5, 3.0, 0.7, 2.2, 4.0, 0.2]))
    assert list(c.split) == ["train"] * 4 + ["test"] * 2 and list(c.fold) == [0, 1, 0, 1, -1, -1]
    assert c.clinical_names == ["age", "radiation"] and torch.isnan(c.clinical[2, 0])
    mean = load_cohort(store, wsi_tile="mean", modalities=["wsi"])
    stored = open_store(store)["wsi/tiles"][:].astype(np.float32)
    assert mean.modalities == ("wsi",)
    np.testing.assert_allclose(mean.inputs["wsi"][[0, 2]].numpy(), stored[[0, 2]].mean(1) / 255, rtol=1e-6)
    np.testing.assert_array_equal(c.inputs["wsi"][[0, 2]].numpy(), stored[[0, 2], 0] / 255)


def test_forked_dataloader_matches_the_in_memory_cohort(store: Path):
    c = load_cohort(store)
    loader = make_dataloader(store, batch_size=4, num_workers=2)
    batches = list(loader)
    assert [b.ids for b in batches] == [IDS[:4], IDS[4:]]
    for b in batches:
        ref = c.batch(np.array([IDS.index(i) for i in b.ids]))
        for m in c.modalities:
            torch.testing.assert_close(b.inputs[m], ref.inputs[m], rtol=0, atol=0)
        assert torch.equal(b.present, ref.present)
    train = make_dataloader(store, split="train", fold=1, batch_size=8)
    assert next(iter(train)).ids == ["P0", "P2"]
    tiles = torch.from_numpy(open_store(store)["wsi/tiles"][0]).float() / 255
    random_tiles = StoreDataset(store, wsi_tile="random")
    torch.manual_seed(0)
    draws = [random_tiles[0]["inputs"]["wsi"] for _ in range(20)]
    drawn = {next(k for k in range(3) if torch.equal(tiles[k], x)) for x in draws}
    assert drawn == {0, 1, 2}  # training draws among the stored tiles; inference takes tile 0
    # the same draws from the in-memory uint8 bank (on the GPU when training there)
    bank, count = load_wsi_bank(store)
    assert bank.shape == (6, 3, 3, 32, 32) and bank.dtype == torch.uint8 and count.tolist() == [3, 0, 3, 0, 0, 0]
    g = torch.Generator().manual_seed(0)
    draws = [draw_wsi_tiles(bank, count, torch.tensor([0, 1]), g) for _ in range(20)]
    assert {next(k for k in range(3) if torch.equal(tiles[k], x[0])) for x in draws} == {0, 1, 2}
    assert all((x[1] == 0).all() for x in draws)  # no slide: zeros


def test_resume_after_a_crash(inputs: Path, store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = tmp_path / "crashed.zarr"
    journal = pp._journal_patient
    calls = []

    def crash_on_third(path: Path, i: int, entry: dict) -> None:
        calls.append(i)
        if len(calls) == 3:  # the third patient's arrays are written, its journal entry is not
            raise RuntimeError("simulated crash")
        journal(path, i, entry)

    monkeypatch.setattr(pp, "_journal_patient", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(inputs, out)
    assert calls == [0, 1, 2]  # image patients in manifest order; P2 crashed
    with pytest.raises(StoreError, match="incomplete"):
        load_cohort(out)
    assert completed_patients(out).tolist() == [True, True, False, False, False, True]  # P5: omics only
    assert load_cohort(out, allow_incomplete=True).ids == ["P0", "P1", "P5"]
    # the slide tile counts of an unfinished store come from the journal (wsi/count is written
    # last): P0's mean is over its 3 tiles, as in the finished store, not over tile 0 alone
    whole = load_cohort(store, wsi_tile="mean")
    partial = load_cohort(out, allow_incomplete=True, wsi_tile="mean")
    torch.testing.assert_close(partial.inputs["wsi"][0], whole.inputs["wsi"][0], rtol=0, atol=0)
    # streaming the unfinished store gives the same patients and values as loading it
    with pytest.raises(StoreError, match=r"crashed.zarr is incomplete.*allow_incomplete=True"):
        StoreDataset(out)
    for mode in ("best", "mean"):
        ds = StoreDataset(out, wsi_tile=mode, allow_incomplete=True)
        ref = load_cohort(out, allow_incomplete=True, wsi_tile=mode)
        assert [ds[k]["id"] for k in range(len(ds))] == ref.ids
        for k in range(len(ds)):
            assert torch.equal(ds[k]["present"], ref.present[k])
            for m in ref.modalities:
                torch.testing.assert_close(ds[k]["inputs"][m], ref.inputs[m][k], rtol=0, atol=0)
    assert [b.ids for b in make_dataloader(out, batch_size=8, allow_incomplete=True)] == [["P0", "P1", "P5"]]
    with pytest.raises(StoreError, match=r"crashed.zarr is incomplete and patients \['P2'\] .*not written yet"):
        StoreDataset(out, indices=[0, 2], allow_incomplete=True)
    # a half-written chunk of the crashed patient: it never reads as complete, and is redone
    chunk = out / "mri" / "data" / "c" / "2" / "0" / "0" / "0" / "0"
    chunk.write_bytes(chunk.read_bytes()[:10])

    monkeypatch.setattr(pp, "_journal_patient", journal)
    seen = []
    process = pp.process_images
    monkeypatch.setattr(pp, "process_images", lambda task: seen.append(task["id"]) or process(task))
    report = run(inputs, out)
    assert seen == ["P2", "P3", "P4"] and report.processed == 3
    assert_same_store(out, store)


def test_killed_run_resumes(inputs: Path, store: Path, tmp_path: Path):
    out = tmp_path / "killed.zarr"
    code = f"""
        import os, warnings
        warnings.simplefilter("ignore")
        from pyimputmae.data import preprocess as pp
        n = []
        def die(path, i, entry):
            n.append(i)
            if len(n) == 2:
                os._exit(9)  # no cleanup of any kind, like SIGKILL
            journal(path, i, entry)
        journal, pp._journal_patient = pp._journal_patient, die
        pp.preprocess({str(inputs / "manifest.csv")!r}, {str(out)!r}, config={CONFIG!r}, workers=0,
                      progress=False, verbose=False)
    """
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 9, proc.stderr
    assert completed_patients(out).tolist() == [True, False, False, False, False, True]
    report = run(inputs, out)
    assert report.processed == 4
    assert_same_store(out, store)


def test_a_store_another_run_is_writing_is_refused(inputs: Path, tmp_path: Path):
    from pyimputmae._runlock import InUseError

    out = tmp_path / "busy.zarr"
    code = f"""
        import time
        from pyimputmae._runlock import exclusive_use
        with exclusive_use({str(tmp_path / ".busy.zarr.lock")!r}, "the store", "wait"):
            print("locked", flush=True)
            time.sleep(120)
    """
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(InUseError, match=rf"the store {out} is being written by another run \(process "
                                             rf"{holder.pid} .*or choose another --out"):
            run(inputs, out)
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()


def test_a_run_killed_while_creating_the_store_is_started_afresh(inputs: Path, store: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch):
    """The store's metadata names it a pyimputmae store from its first file on: before, a run killed
    between zarr's first metadata file and the attributes left a folder the next run refused as
    "not a pyimputmae store" (the same for a folder holding only a zarr temporary)."""
    import zarr

    out = tmp_path / "cut.zarr"
    create, calls = zarr.Group.create_array, []

    def crash_on_the_third_array(self, *args, **kwargs):
        calls.append(args)
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return create(self, *args, **kwargs)

    monkeypatch.setattr(zarr.Group, "create_array", crash_on_the_third_array)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(inputs, out)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="incomplete"):
        load_cohort(out)
    run(inputs, out)
    assert_same_store(out, store)

    earlier = tmp_path / "cut_earlier.zarr"  # killed before zarr renamed its first file into place
    earlier.mkdir()
    (earlier / f"zarr.{'0123abcd' * 4}.partial").write_bytes(b'{"zarr_format": 3, "node')
    run(inputs, earlier)
    assert_same_store(earlier, store)


def test_a_run_killed_while_replacing_a_store_is_finished_by_the_next(inputs: Path, store: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    """--overwrite removes the old store first. A crash in the middle of that used to leave either
    a folder without zarr.json, refused by every later run, or one whose zarr.json still said
    complete, which a run without --overwrite then took as finished with chunks missing. Now the
    store is marked unfinished before anything goes, and zarr.json goes last."""
    out = tmp_path / "replaced.zarr"
    shutil.copytree(store, out)
    unlink, removed = os.unlink, []

    def crash_on_the_third_file(path, *args, **kwargs):
        removed.append(path)
        if len(removed) == 3:
            raise RuntimeError("simulated crash")
        return unlink(path, *args, **kwargs)

    monkeypatch.setattr(os, "unlink", crash_on_the_third_file)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(inputs, out, overwrite=True)
    monkeypatch.undo()
    with pytest.raises(StoreError, match="incomplete"):  # never read as the finished store it was
        load_cohort(out)
    report = run(inputs, out)  # the same command without --overwrite
    assert report.processed == 5 and report.resumed == 0
    assert_same_store(out, store)


def test_what_a_killed_run_left_in_the_store_is_removed_when_it_runs_again(inputs: Path, store: Path,
                                                                           tmp_path: Path):
    """Killed while removing the journal of a finished store (its last step), and while zarr wrote
    a chunk (a temporary as large as the chunk): the next run removes both."""
    out = tmp_path / "leftovers.zarr"
    shutil.copytree(store, out)
    (out / "_progress" / "images").mkdir(parents=True)
    (out / "_progress" / "images" / "000001.json").write_text("{}")
    partial = out / "wsi" / "tiles" / "c" / "0" / "0" / "0" / "0" / f"0.{'ab' * 16}.partial"
    partial.write_bytes(b"half a chunk")
    report = run(inputs, out)
    assert report.processed == 0 and not (out / "_progress").exists() and not partial.exists()
    assert_same_store(out, store)


def test_chunks_reach_the_disk_before_the_journal_vouches_for_them(inputs: Path, store: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch):
    """A power loss must not leave a journal entry (or `complete`) whose arrays were still in the page
    cache: every chunk a patient's entry, a modality's entry or the finished store vouches for is
    fsynced before that entry is written."""
    from pyimputmae.data import preprocess_stages as stages

    out = tmp_path / "durable.zarr"
    events: list[tuple[str, Path]] = []
    fsync = stages._fsync_file
    monkeypatch.setattr(stages, "_fsync_file", lambda path: (events.append(("fsync", Path(path))), fsync(path)))
    journal = stages._write_json_atomic
    monkeypatch.setattr(stages, "_write_json_atomic",
                        lambda path, obj: (events.append(("journal", Path(path))), journal(path, obj)))
    patient = pp._journal_patient
    monkeypatch.setattr(pp, "_journal_patient", lambda path, i, entry: (events.append(("journal", Path(path) / str(i))),
                                                                        patient(path, i, entry)))
    run(inputs, out)
    chunks = lambda folder: sorted(p for p in folder.rglob("*") if p.is_file())
    synced_before = lambda k: {p for kind, p in events[:k] if kind == "fsync"}
    checked = 0
    for k, (kind, path) in enumerate(events):
        if kind != "journal":
            continue
        if path.parent == out:  # a patient's image entry
            i = int(path.name)
            want = [*chunks(out / "wsi" / "tiles" / "c" / str(i)), *chunks(out / "mri" / "data" / "c" / str(i))]
        elif path.name in ("rna.json", "dnam.json"):
            want = chunks(out / path.stem)
        else:
            continue
        assert set(want) <= synced_before(k), (path, sorted(set(want) - synced_before(k)))
        checked += bool(want)
    assert checked == 2 + 3  # two omics modalities, three patients with a slide or an MRI read
    # the finished store: zarr.json (with complete = True) is flushed after it was written
    assert events[-1] == ("fsync", out / "zarr.json")
    assert_same_store(out, store)


def test_rerun_skips_a_complete_store_and_refuses_other_options(inputs: Path, store: Path, tmp_path: Path):
    out = tmp_path / "again.zarr"
    shutil.copytree(store, out)
    report = run(inputs, out)
    assert report.processed == 0 and report.resumed == 6
    with pytest.raises(FileExistsError, match="another manifest or with other options; pass --overwrite"):
        with pytest.warns(ManifestWarning):
            pp.preprocess(inputs / "manifest.csv", out, config={**CONFIG, "codec": "zstd"}, progress=False,
                          verbose=False)
    other = tmp_path / "not_a_store"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a pyimputmae store"), pytest.warns(ManifestWarning):
        pp.preprocess(inputs / "manifest.csv", other, config=CONFIG, overwrite=True, progress=False, verbose=False)
    assert (other / "precious.txt").exists()


def test_new_patients_reuse_the_fitted_preprocessing(inputs: Path, store: Path, tmp_path: Path):
    new = pd.DataFrame({"patient_id": ["NEW0", "NEW2"], "age": [40, ""], "radiation": ["yes", "maybe"],
                        "rna": [str(inputs / "P0.star.tsv"), str(inputs / "P2.star.tsv")],
                        "dnam": [str(inputs / "beta.tsv#P0"), str(inputs / "beta.tsv#P2")],
                        "wsi": [str(SLIDE), ""], "mri": ["", str(inputs / "mri_case")]})
    new.to_csv(tmp_path / "new.csv", index=False)
    out = tmp_path / "new.zarr"
    with pytest.warns(ManifestWarning, match=r"clinical column 'radiation' holds yes/no values, but 1 value\(s\) "
                                             r"are not: line 3 \(patient 'NEW2'\) 'maybe'"):
        pp.apply_preprocessing(tmp_path / "new.csv", store, out, workers=0, progress=False, verbose=False)
    a, b = load_cohort(out), load_cohort(store)
    assert load_preprocessing(out)["rna"] == load_preprocessing(store)["rna"]
    assert list(a.split) == ["test", "test"] and torch.isnan(a.time).all()
    for m in ("rna", "dnam"):
        torch.testing.assert_close(a.inputs[m], b.inputs[m][[0, 2]], rtol=0, atol=0)
    torch.testing.assert_close(a.inputs["wsi"][0], b.inputs["wsi"][0], rtol=0, atol=0)
    torch.testing.assert_close(a.inputs["mri"][1], b.inputs["mri"][2], rtol=0, atol=0)
    assert a.clinical[0].tolist() == [40.0, 1.0] and torch.isnan(a.clinical[1]).all()  # "maybe": unseen level


def test_command_line_with_a_process_pool(inputs: Path, store: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "cli.zarr"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rc = pp.main([str(inputs / "manifest.csv"), "--out", str(out), "--config", str(inputs / "config.json"),
                      "--workers", "2", "--no-progress"])
    assert rc == 0
    assert_same_store(out, store)
    # manifest warnings: once each, in the summary, without Python's warning header and source line
    assert not [w for w in caught if issubclass(w.category, ManifestWarning)]
    err = capsys.readouterr().err
    assert err.count("line 6 (patient 'PDUP'): duplicate patient id") == 1
    assert "manifest.csv: 2 row(s) left out, 0 warning(s): listed in the summary at the end" in err
    assert "rejected manifest rows (2):\n  manifest.csv line 6 (patient 'PDUP')" in err
    assert "ManifestWarning" not in err and "read_manifest(" not in err


def test_slide_resolutions_in_the_report_and_provenance(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """A TIFF whose tags record 72 dpi (352.8 µm/px) is tiled at --wsi-default-mpp with a note in the
    report naming it; --wsi-force-mpp overrides every slide; the provenance says which was used."""
    slide = need(SLIDE, "the real Aperio slide cmu_small_region.svs")
    write_tiled_tiff(tmp_path / "export.tiff", stained_section(), 72, "inch")
    pd.DataFrame({"patient_id": ["P0", "P1"], "time": [1.0, 2.0], "event": [1, 0],
                  "wsi": [str(slide), "export.tiff"]}).to_csv(tmp_path / "manifest.csv", index=False)
    small = ["--modalities", "wsi", "--wsi-tile-px", "32", "--wsi-mpp", "2", "--wsi-candidates", "6",
             "--wsi-keep", "3", "--workers", "0", "--no-progress"]

    def run_cli(out: str, *flags: str) -> tuple[dict, list[dict]]:
        assert pp.main([str(tmp_path / "manifest.csv"), "--out", str(tmp_path / out), *small, *flags]) == 0
        root = open_store(tmp_path / out)
        return root.attrs["report"], [s and s["resolution"] for s in root["provenance"].attrs["sources"]["wsi"]]

    report, res = run_cli("refused.zarr")
    assert [(p, m) for p, m, _ in report["failures"]] == [("P1", "wsi")] and res[1] is None
    assert re.search(r"export.tiff \(patient 'P1'\): the slide records 352.8 µm/px .* set --wsi-force-mpp",
                     report["failures"][0][2])
    report, res = run_cli("default.zarr", "--wsi-default-mpp", "0.5")
    assert report["failures"] == [] and len(report["warnings"]) == 1
    assert re.fullmatch(r".*export.tiff \(patient 'P1'\): the slide records 352.8 µm/px \(.*\), outside the "
                        r"0.05–20 µm/px .*; tiled as 0.5 µm/px \(--wsi-default-mpp\)", report["warnings"][0])
    assert "warnings (1):\n  " in capsys.readouterr().err  # in the summary printed at the end
    assert res[0] == {"slide_mpp": pytest.approx(0.499), "from": "file", "recorded_mpp": pytest.approx(0.499)}
    assert res[1] == {"slide_mpp": 0.5, "from": "default_mpp", "recorded_mpp": pytest.approx(352.78, rel=1e-4)}
    report, res = run_cli("forced.zarr", "--wsi-force-mpp", "0.25", "--wsi-default-mpp", "0.5")
    assert report["failures"] == [] and report["warnings"] == []
    assert [(r["slide_mpp"], r["from"]) for r in res] == [(0.25, "force_mpp")] * 2
    assert load_preprocessing(tmp_path / "forced.zarr")["config"]["wsi"]["force_mpp"] == 0.25


def test_a_crashing_worker_fails_only_its_patient():
    # plain stand-ins for the sources, so the workers need not import the package
    tasks = [{"index": i, "id": f"P{i}", "wsi": SimpleNamespace(path=Path(f"slide{i}.svs"))} for i in range(5)]
    results = []
    pp._run_tasks(tasks, 1, results.append, fn=crash_on_p2, initializer=None)
    status = {r["id"]: r["wsi"] for r in results}
    assert sorted(status) == [f"P{i}" for i in range(5)]
    assert all(status[p]["status"] == "present" for p in status if p != "P2")
    assert status["P2"]["status"] == "failed"
    assert "slide2.svs (patient 'P2'): the reader crashed its worker process" in status["P2"]["error"]


def test_a_manifest_without_files_is_an_error_naming_the_columns(tmp_path: Path):
    # the shared cohort table as it is: availability flags, no paths
    (tmp_path / "cohort.csv").write_text("patient_id,time_years,event,age_years,has_rna,has_wsi\n"
                                         "P1,1.5,1,40,1,0\nP2,2.0,0,55,0,1\n")
    out = tmp_path / "cohort.zarr"
    message = (r"cohort.csv: no file path column for any of rna, wsi \(looked for rna: rna, rna_path; wsi: wsi, "
               r"wsi_path; the columns are patient_id, time_years, event, age_years, has_rna, has_wsi; has_rna, "
               r"has_wsi are availability flags, not file paths\): the store would hold clinical data alone")
    with pytest.raises(ManifestError, match=message):
        pp.preprocess(tmp_path / "cohort.csv", out, config={**CONFIG, "modalities": ["rna", "wsi"]}, progress=False,
                      verbose=False)
    assert not out.exists()
    # new patients (a fitted store): predictions from clinical data alone are possible, so a warning
    notes = pp.check_sources(read_manifest(tmp_path / "cohort.csv"), ("rna", "wsi"), training=False)
    assert len(notes) == 1 and re.match(message.replace("the store would hold clinical data alone",
                                                        "every patient lacks every modality"), notes[0])
    # path columns whose every entry is empty or gone
    (tmp_path / "paths.csv").write_text("patient_id,time,event,rna\nP1,1.5,1,\nP2,2.0,0,gone.tsv\n")
    message = r"paths.csv: no patient has a file for any of rna \(columns rna: every entry is empty or a path that"
    with pytest.raises(ManifestError, match=message), pytest.warns(ManifestWarning, match="'gone.tsv' does not exist"):
        pp.preprocess(tmp_path / "paths.csv", out, config={**CONFIG, "modalities": ["rna"]}, progress=False,
                      verbose=False)


def test_a_cohort_without_training_patients_needs_fitted(tmp_path: Path):
    # new patients preprocessed without --fitted: nothing to fit the features and clinical encoding on, so
    # every omics file would fail; an error that says to pass --fitted, before a store is written
    pd.DataFrame({"P1": [0.2, 0.4], "P2": [0.6, 0.8]}, index=["cg1", "cg2"]).to_csv(tmp_path / "beta.tsv", sep="\t")
    (tmp_path / "new.csv").write_text("patient_id,time,event,split,dnam\nP1,1,1,test,beta.tsv\nP2,2,0,val,beta.tsv\n")
    out = tmp_path / "new.zarr"
    with pytest.raises(ManifestError, match=r"new.csv: no patient is in the training split \(test 1, val 1\): .* "
                                            r"pass --fitted TRAINING_STORE"):
        pp.preprocess(tmp_path / "new.csv", out, config={**CONFIG, "modalities": ["dnam"]}, progress=False,
                      verbose=False)
    assert not out.exists()


def test_m_values_given_as_beta_values_are_a_warning_in_the_report(tmp_path: Path):
    """A cohort-level omics warning (every DNAm file holds values outside [0, 1]) is shown when it
    happens and kept in the report, whose summary a user reads after a long run."""
    from pyimputmae.data.omics import OmicsWarning

    ids = ["P0", "P1", "P2"]
    m_values = np.random.default_rng(1).normal(0.0, 3.0, (3, 10))
    pd.DataFrame(m_values, index=ids, columns=[f"cg{j:04d}" for j in range(10)]).to_csv(tmp_path / "m.tsv", sep="\t")
    pd.DataFrame({"patient_id": ids, "time": [1.0, 2.0, 3.0], "event": [1, 0, 1], "split": ["train"] * 3,
                  "dnam": ["m.tsv"] * 3}).to_csv(tmp_path / "manifest.csv", index=False)
    config = {**CONFIG, "modalities": ["dnam"]}
    with pytest.warns(OmicsWarning, match="the files look like M-values") as caught:
        report = pp.preprocess(tmp_path / "manifest.csv", tmp_path / "s.zarr", config=config, progress=False,
                               verbose=False, workers=0)
    cohort_level = [str(w.message) for w in caught if issubclass(w.category, OmicsWarning)]
    assert report.warnings == cohort_level and len(cohort_level) == 1
    assert report.counts["dnam"]["failed"] == 3
    assert "look like M-values" in report.table()


def test_a_modality_without_a_path_column_is_a_warning_in_the_report(inputs: Path, tmp_path: Path):
    table = pd.read_csv(inputs / "manifest.csv", dtype=str, keep_default_na=False).drop(columns=["rna", "wsi", "mri"])
    table["dnam"] = [str(inputs / p) if p else "" for p in table["dnam"]]
    table.iloc[[0, 1, 2, 3, 5]].to_csv(tmp_path / "no_mri.csv", index=False)
    config = {**CONFIG, "modalities": ["dnam", "mri"]}
    message = ("no_mri.csv: no file path column for mri (looked for mri: mri, mri_path, mri_t1, mri_t1ce, mri_t2, "
               "mri_flair, mri_tumor_mask, mri_tumour_mask, mri_seg, mri_brain_mask): every patient counts as "
               "missing it; --modalities dnam leaves it out of the store")
    with pytest.warns(ManifestWarning, match=re.escape(message)):
        report = pp.preprocess(tmp_path / "no_mri.csv", tmp_path / "s.zarr", config=config, progress=False,
                               verbose=False, workers=0)
    assert report.warnings == [message] and report.counts["mri"]["missing"] == 5
    with pytest.raises(ManifestError, match=re.escape(message)):
        pp.preprocess(tmp_path / "no_mri.csv", tmp_path / "strict.zarr", config=config, progress=False,
                      verbose=False, strict=True)


def test_fitted_refuses_settings_it_would_ignore(store: Path, tmp_path: Path):
    # --fitted takes every setting from the training store: a flag given with it was silently dropped
    (tmp_path / "new.csv").write_text("patient_id,age\nNEW0,40\n")
    out = tmp_path / "new.zarr"
    with pytest.raises(ValueError, match=rf"--fitted {re.escape(str(store))} applies the training store's "
                                         r"preprocessing unchanged .*, so --clinical, --rna-width, --rna-no-log1p, "
                                         r"--wsi-force-mpp would be ignored: leave them out"):
        pp.main([str(tmp_path / "new.csv"), "--out", str(out), "--fitted", str(store), "--clinical", "age",
                 "--rna-width", "0", "--rna-no-log1p", "--wsi-force-mpp", "0.25"])
    assert not out.exists()
    # every flag of the parser is either a setting (refused with --fitted) or about the run itself
    parser = argparse.ArgumentParser()
    command = pp.add_parser(parser.add_subparsers())
    dests = {a.dest for a in command._actions} - {"help", "manifest", "out", "fitted", "workers", "strict",
                                                 "overwrite", "no_progress"}
    assert dests == set(pp._SETTING_FLAGS)

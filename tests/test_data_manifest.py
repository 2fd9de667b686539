"""Cohort manifest: validation messages name the line and the value; the clinical encoding is fitted
on the training split."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pyimputmae.data.manifest import (
    ManifestError,
    ManifestWarning,
    apply_clinical,
    fit_clinical,
    read_manifest,
)


def write(tmp_path: Path, text: str, name: str = "manifest.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "a.tsv").write_text("x")
    (tmp_path / "s1.svs").write_text("x")
    return tmp_path


def test_valid_manifest_resolves_paths_relative_to_its_folder(files: Path):
    path = write(files, "patient_id,time,event,split,fold,age,rna,wsi\n"
                        "P1,1.5,1,train,0,50,a.tsv#S1,s1.svs\n"
                        "P2,2.0,0,test,,61,,\n")
    m = read_manifest(path)
    assert m.ids == ["P1", "P2"]
    np.testing.assert_array_equal(m.time, [1.5, 2.0])
    np.testing.assert_array_equal(m.fold, [0, -1])
    assert list(m.split) == ["train", "test"]
    assert m.sources["rna"][0].path == files / "a.tsv" and m.sources["rna"][0].select == "S1"
    assert m.sources["wsi"][0].path == files / "s1.svs"
    assert m.sources["rna"][1] is None and m.sources["mri"] == [None, None]
    assert list(m.clinical.columns) == ["age"]
    assert len(m.sha256) == 64


def test_duplicate_id_is_named_with_both_lines_and_the_rest_is_kept(files: Path):
    path = write(files, "patient_id,time,event\nP1,1,1\nP2,2,0\nP1,3,0\nP3,4,1\n")
    with pytest.warns(ManifestWarning) as caught:
        m = read_manifest(path)
    assert [str(w.message) for w in caught] == [
        "manifest.csv line 2 (patient 'P1'): duplicate patient id, also on line(s) 4; row left out",
        "manifest.csv line 4 (patient 'P1'): duplicate patient id, also on line(s) 2; row left out"]
    assert m.ids == ["P2", "P3"]  # both rows of the ambiguous id are left out
    assert len(m.rejected) == 2
    with pytest.raises(ManifestError, match=r"(?s)manifest.csv: 2 problem\(s\):.*line 2.*duplicate.*line 4.*duplicate"):
        read_manifest(path, strict=True)


def test_ids_of_one_patient_in_other_case_or_barcode_forms_are_duplicates(files: Path):
    # the same patient twice (e.g. once in train and once in test) would leak into the evaluation
    path = write(files, "patient_id,time,event,split\nTCGA-CS-4938,1,1,train\ntcga-cs-4938 ,2,0,test\n"
                        "TCGA-CS-4941-01A,1,0,train\nTCGA-CS-4941,1,1,test\nP7,1,1,train\np7,1,0,test\nP8,3,0,test\n")
    with pytest.warns(ManifestWarning) as caught:
        m = read_manifest(path)
    assert m.ids == ["P8"]
    messages = [str(w.message) for w in caught]
    assert ("manifest.csv line 3 (patient 'tcga-cs-4938'): duplicate patient, also on line(s) 2 ('TCGA-CS-4938'): "
            "barcodes of the same TCGA case 'TCGA-CS-4938' name one patient; keep one row per patient; row left out"
            ) in messages
    assert ("manifest.csv line 4 (patient 'TCGA-CS-4941-01A'): duplicate patient, also on line(s) 5 ('TCGA-CS-4941'): "
            "barcodes of the same TCGA case 'TCGA-CS-4941' name one patient; keep one row per patient; row left out"
            ) in messages
    assert ("manifest.csv line 7 (patient 'p7'): duplicate patient, also on line(s) 6 ('P7'): ids that differ only "
            "in case name one patient; keep one row per patient; row left out") in messages
    assert len(messages) == 6
    # distinct samples of distinct cases, and ids that only share a beginning, stay apart
    path = write(files, "patient_id,time,event\nTCGA-CS-4938-01A,1,1\nTCGA-CS-4939-01A,2,0\nP1,1,1\nP10,2,0\n")
    assert read_manifest(path).ids == ["TCGA-CS-4938-01A", "TCGA-CS-4939-01A", "P1", "P10"]


@pytest.mark.parametrize("kind", ["parquet", "dataframe"])
def test_missing_cells_of_nullable_columns_are_empty_cells(files: Path, kind: str):
    # pandas' nullable dtypes (Int64, string) hold pd.NA, which str() writes '<NA>': an empty cell, not a value
    table = pd.DataFrame({"patient_id": ["P1", "P2"], "time": [1.5, 2.0],
                          "event": pd.array([1, 0], dtype="Int64"), "fold": pd.array([0, None], dtype="Int64"),
                          "grade": pd.array(["G2", None], dtype="string"), "age": pd.array([40, None], dtype="Int64")})
    if kind == "parquet":
        table.to_parquet(files / "manifest.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ManifestWarning)
        m = read_manifest(files / "manifest.parquet" if kind == "parquet" else table)
    assert m.ids == ["P1", "P2"]
    np.testing.assert_array_equal(m.fold, [0, -1])
    np.testing.assert_array_equal(m.event, [1, 0])
    encoded = apply_clinical(m.clinical, fit_clinical(m.clinical, np.array([True, True])))
    np.testing.assert_array_equal(np.isnan(encoded), [[False, False], [True, True]])
    missing = pd.DataFrame({"patient_id": ["P1", "P2"], "time": [1.0, None], "event": pd.array([1, None], "Int64")})
    with pytest.warns(ManifestWarning, match=r"line 3 \(patient 'P2'\): missing time; .*missing event; row left out"):
        assert read_manifest(missing).ids == ["P1"]


def lenient_then_strict(path: Path, message: str, warned: str = "", **kw):
    """The manifest read as usual, which warns ``message + warned`` (a regex); read with
    ``strict=True`` the same file is an error matching ``message``."""
    with pytest.raises(ManifestError, match=message):
        read_manifest(path, strict=True, **kw)
    with pytest.warns(ManifestWarning, match=message + warned):
        return read_manifest(path, **kw)


@pytest.mark.parametrize(("time", "event", "message"), [
    ("-0.5", "1", r"line 3 \(patient 'P2'\): time '-0.5' is negative"),
    ("", "1", r"line 3 \(patient 'P2'\): missing time"),
    ("soon", "1", r"line 3 \(patient 'P2'\): time 'soon' is not a number"),
    ("1.0", "2", r"line 3 \(patient 'P2'\): event '2' is not 0/1"),
    ("1.0", "dead", r"line 3 \(patient 'P2'\): event 'dead' is not 0/1 \(write 1 where the death was observed"),
])
def test_bad_survival_values_are_named(files: Path, time: str, event: str, message: str):
    path = write(files, f"patient_id,time,event\nP1,1,0\nP2,{time},{event}\n")
    assert lenient_then_strict(path, message).ids == ["P1"]


def test_missing_path_is_a_warning_or_a_strict_error(files: Path):
    path = write(files, "patient_id,time,event,wsi\nP1,1,1,s1.svs\nP2,2,0,gone.svs\n")
    m = lenient_then_strict(path, r"line 3 \(patient 'P2'\): wsi path 'gone.svs' does not exist",
                            r"; wsi counted as missing")
    assert m.ids == ["P1", "P2"] and m.sources["wsi"][1] is None


def test_prediction_manifest_may_lack_survival(files: Path):
    path = write(files, "patient_id,rna\nNEW1,a.tsv\n")
    with pytest.raises(ManifestError, match="no time column"):
        read_manifest(path)
    m = read_manifest(path, require_survival=False, default_split="test")
    assert np.isnan(m.time).all() and list(m.split) == ["test"]


def test_tsv_with_aliases_and_mri_per_sequence_columns(files: Path):
    (files / "t1ce.nii.gz").write_text("x")
    (files / "seg.nii.gz").write_text("x")
    path = write(files, "case_id\ttime_years\tstatus\tcv_fold\tmri_t1ce\tmri_seg\thas_rna\n"
                        "P1\t3\t0\t2\tt1ce.nii.gz\tseg.nii.gz\t1\n", "m.tsv")
    m = read_manifest(path)
    src = m.sources["mri"][0]
    assert dict(src.parts) == {"t1ce": files / "t1ce.nii.gz", "tumor_mask": files / "seg.nii.gz"}
    assert m.fold[0] == 2 and list(m.clinical.columns) == []  # has_* flags are not clinical


def test_path_columns_of_modalities_left_out_are_not_clinical(files: Path):
    # `preprocess --modalities rna` on a manifest that also lists slides and MRI: those paths are not
    # clinical data (they were one-hot encoded as categories, one level per file)
    path = write(files, "patient_id,time,event,age,rna,wsi_path,MRI,mri_t1ce,mri_brain_mask\n"
                        "P1,1.5,1,50,a.tsv,s1.svs,,,\nP2,2.0,0,61,,,,,\n")
    m = read_manifest(path, modalities=("rna",))
    assert list(m.clinical.columns) == ["age"]
    assert m.sources["rna"][0].path == files / "a.tsv"
    m = read_manifest(path, modalities=("rna",), clinical_columns=["age", "wsi_path"])  # named: taken
    assert list(m.clinical.columns) == ["age", "wsi_path"]


def test_clinical_encoding_is_fitted_on_train_only(files: Path):
    path = write(files, "patient_id,time,event,split,radiation,age,grade\n"
                        "P1,1,1,train,yes,40,G2\nP2,1,0,train,no,,G3\nP3,1,0,train,,60,G3\n"
                        "P4,1,1,test,yes,200,G4\n")
    with pytest.warns(ManifestWarning) as caught:
        m = read_manifest(path)
    assert [str(w.message) for w in caught] == [
        "manifest.csv: clinical column 'grade': 1 value(s) of a level no training patient had (training levels: "
        "'G2', 'G3'): line 5 (patient 'P4') 'G4'; read as unknown, as the model has no feature for it (if it is a "
        "training level spelled differently, correct the spelling)"]
    fitted = fit_clinical(m.clinical, m.split == "train")
    names = [f["name"] for f in fitted["features"]]
    assert names == ["radiation", "age", "grade=G3"]  # G4 appears only in test: no feature
    raw = apply_clinical(m.clinical, fitted)
    np.testing.assert_array_equal(raw[:, 0], [1, 0, np.nan, 1])
    np.testing.assert_array_equal(raw[:, 2], [0, 1, 1, np.nan])  # unseen level → unknown
    assert fitted["mean"][1] == pytest.approx(50.0)  # the test patient's age 200 is not in it
    z = apply_clinical(m.clinical, fitted, standardize=True)
    assert z[0, 1] == pytest.approx(-1.0)


def test_missing_value_markers_are_unknown_not_categories(files: Path):
    # how GDC and TCGA BCR tables write "unknown": never a category, never a reason to go categorical
    path = write(files, "patient_id,time,event,age,race\n"
                        "P1,1,1,40,white\nP2,1,0,'--,not reported\nP3,1,0,Unknown,[Unknown]\n"
                        "P4,1,1,[Not Available],asian\nP5,1,0,[Discrepancy],[Not Applicable]\nP6,1,1,60,'--\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about
        m = read_manifest(path)
    fitted = fit_clinical(m.clinical, np.ones(len(m), bool))
    assert [f["name"] for f in fitted["features"]] == ["age", "race=white"]
    assert fitted["features"][0]["kind"] == "numeric"
    raw = apply_clinical(m.clinical, fitted)
    np.testing.assert_array_equal(raw[:, 0], [40, np.nan, np.nan, np.nan, np.nan, 60])
    np.testing.assert_array_equal(raw[:, 1], [1, np.nan, np.nan, 0, np.nan, np.nan])


def test_text_in_a_numeric_column_is_named_and_read_as_unknown(files: Path):
    ages = ["40", "37.1a", "55", "61", "n.d.", "48"]
    rows = "".join(f"P{i},1,{i % 2},{a},{'yes' if i % 2 else 'no'}\n" for i, a in enumerate(ages))
    path = write(files, "patient_id,time,event,age,radiation\n" + rows)
    message = (r"manifest.csv: clinical column 'age' holds numbers, but 2 value\(s\) are not: line 3 \(patient 'P1'\) "
               r"'37.1a', line 6 \(patient 'P4'\) 'n.d.'; correct them")
    m = lenient_then_strict(path, message, r".*; read as unknown")
    fitted = fit_clinical(m.clinical, np.ones(len(m), bool))
    assert [f["name"] for f in fitted["features"]] == ["age", "radiation"]  # not one feature per age
    np.testing.assert_array_equal(apply_clinical(m.clinical, fitted)[:, 0], [40, np.nan, 55, 61, np.nan, 48])


def test_new_patients_are_checked_against_the_fitted_column_kinds(files: Path):
    train = write(files, "patient_id,time,event,age,radiation\nP1,1,1,40,yes\nP2,1,0,60,no\n", "train.csv")
    fitted = fit_clinical(read_manifest(train).clinical, np.ones(2, bool))
    # alone, this manifest's age column looks like text: the fitted kinds decide
    new = write(files, "patient_id,age,radiation\nN1,abc,maybe\nN2,[Not Available],no\n", "new.csv")
    with pytest.warns(ManifestWarning) as caught:
        m = read_manifest(new, require_survival=False, clinical_fitted=fitted)
    assert [str(w.message) for w in caught] == [
        "new.csv: clinical column 'age' holds numbers, but 1 value(s) are not: line 2 (patient 'N1') 'abc'; "
        "correct them, or leave a cell empty where the value is unknown; read as unknown",
        "new.csv: clinical column 'radiation' holds yes/no values, but 1 value(s) are not: line 2 (patient 'N1') "
        "'maybe'; correct them, or leave a cell empty where the value is unknown; read as unknown"]
    np.testing.assert_array_equal(apply_clinical(m.clinical, fitted), [[np.nan, np.nan], [np.nan, 0]])


def test_new_patients_with_a_level_the_fitted_encoding_lacks_are_named(files: Path):
    train = write(files, "patient_id,time,event,grade,site\nP1,1,1,G2,brain\nP2,1,0,G3,brain\n", "train.csv")
    fitted = fit_clinical(read_manifest(train).clinical, np.ones(2, bool))
    new = write(files, "patient_id,grade,site,extra\nN1,G 3,brain,a\nN2,G2,lung,b\nN3,,[Unknown],c\n"
                       "N4,G4,brain,d\n", "new.csv")
    with pytest.warns(ManifestWarning) as caught:
        m = read_manifest(new, require_survival=False, clinical_fitted=fitted)
    assert [str(w.message) for w in caught] == [
        "new.csv: clinical column 'grade': 2 value(s) of a level no training patient had (training levels: 'G2', "
        "'G3'): line 2 (patient 'N1') 'G 3', line 5 (patient 'N4') 'G4'; read as unknown, as the model has no "
        "feature for it (if it is a training level spelled differently, correct the spelling)",
        "new.csv: clinical column 'site': 1 value(s) of a level no training patient had (training levels: "
        "'brain'): line 3 (patient 'N2') 'lung'; read as unknown, as the model has no feature for it (if it is a "
        "training level spelled differently, correct the spelling)"]  # 'extra' is not in the encoding: ignored
    np.testing.assert_array_equal(apply_clinical(m.clinical, fitted)[:, 0], [np.nan, 0, np.nan, np.nan])


def test_a_free_text_column_gets_advice_to_leave_it_out_not_to_fix_spellings(files: Path):
    rows = "".join(f"P{i},1,{i % 2},{'train' if i < 20 else 'test'},note {i}\n" for i in range(40))
    path = write(files, "patient_id,time,event,split,comment\n" + rows)
    with pytest.warns(ManifestWarning) as caught:
        read_manifest(path)
    [message] = [str(w.message) for w in caught]
    assert message.startswith("manifest.csv: clinical column 'comment': 20 value(s) of a level no training patient "
                              "had (training levels: 'note 0', 'note 1', 'note 10', ")
    assert message.endswith("line 22 (patient 'P20') 'note 20', line 23 (patient 'P21') 'note 21', line 24 (patient "
                            "'P22') 'note 22', line 25 (patient 'P23') 'note 23', line 26 (patient 'P24') 'note 24', "
                            "line 27 (patient 'P25') 'note 25', line 28 (patient 'P26') 'note 26', line 29 (patient "
                            "'P27') 'note 27', line 30 (patient 'P28') 'note 28', line 31 (patient 'P29') 'note 29' "
                            "and 10 more; read as unknown, as the model has no feature for it (its values rarely "
                            "repeat (identifiers or free text?): leave it out of the clinical columns (name the ones "
                            "to use: --clinical, or clinical_columns in the settings))")
    # a column no training patient has a value in gives no feature and no warning, as with a fitted encoding
    path = write(files, "patient_id,time,event,split,grade\nP1,1,1,train,\nP2,1,0,test,G2\n", "empty.csv")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_manifest(path)


def test_a_typo_in_a_yes_no_column_is_a_stray_not_a_category(files: Path):
    answers = ["yes"] * 50 + ["no"] * 50 + ["yse"]
    rows = "".join(f"P{i},1,{i % 2},{a}\n" for i, a in enumerate(answers))
    path = write(files, "patient_id,time,event,radiation\n" + rows)
    message = (r"manifest.csv: clinical column 'radiation' holds yes/no values, but 1 value\(s\) are not: "
               r"line 102 \(patient 'P100'\) 'yse'; correct them")
    m = lenient_then_strict(path, message, r".*; read as unknown")
    fitted = fit_clinical(m.clinical, np.ones(len(m), bool))
    assert [(f["name"], f["kind"]) for f in fitted["features"]] == [("radiation", "binary")]  # not 3 one-hot levels
    raw = apply_clinical(m.clinical, fitted)[:, 0]
    assert raw[:50].tolist() == [1.0] * 50 and raw[50:100].tolist() == [0.0] * 50 and np.isnan(raw[100])
    # new patients read with --fitted: the same typo is named too
    new = write(files, "patient_id,radiation\nN1,yse\nN2,no\n", "new.csv")
    with pytest.warns(ManifestWarning, match=r"new.csv: clinical column 'radiation' holds yes/no values, but 1 "
                                             r"value\(s\) are not: line 2 \(patient 'N1'\) 'yse'"):
        m = read_manifest(new, require_survival=False, clinical_fitted=fitted)
    np.testing.assert_array_equal(apply_clinical(m.clinical, fitted)[:, 0], [np.nan, 0])
    # a text column that is not mostly yes/no stays one-hot
    text = fit_clinical(read_manifest(write(files, "patient_id,time,event,arm\nP1,1,1,yes\nP2,1,0,drug\n"
                                            "P3,1,0,placebo\n", "arm.csv")).clinical, np.ones(3, bool))
    assert [f["name"] for f in text["features"]] == ["arm=drug", "arm=placebo", "arm=yes"]


@pytest.mark.parametrize("marker", ["'--", "Unknown", "[Not Available]", "not reported"])
def test_missing_value_markers_in_survival_are_empty_cells(files: Path, marker: str):
    path = write(files, f"patient_id,time,event,rna\nNEW1,{marker},{marker},a.tsv\nNEW2,2.5,1,a.tsv\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a new patient's unknown survival is no problem
        m = read_manifest(path, require_survival=False, default_split="test")
    assert m.ids == ["NEW1", "NEW2"] and np.isnan(m.time[0]) and np.isnan(m.event[0]) and m.time[1] == 2.5
    message = (re.escape(f"line 2 (patient 'NEW1'): missing time ({marker!r}); ") + ".*"
               + re.escape(f"line 2 (patient 'NEW1'): missing event ({marker!r})"))
    assert lenient_then_strict(path, message, "; row left out").ids == ["NEW2"]


def test_markers_in_split_and_fold_are_rejected_not_defaults(files: Path):
    path = write(files, "patient_id,time,event,split,fold\nP1,1,1,Unknown,0\nP2,1,0,train,'--\nP3,2,0,train,\n")
    with pytest.warns(ManifestWarning) as caught:
        m = read_manifest(path)
    assert m.ids == ["P3"] and m.fold.tolist() == [-1]
    assert [str(w.message) for w in caught] == [
        "manifest.csv line 2 (patient 'P1'): split 'Unknown' is not one of train, val, test; row left out",
        "manifest.csv line 3 (patient 'P2'): fold \"'--\" is not an integer (leave the cell empty for no fold); "
        "row left out"]

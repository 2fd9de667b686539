"""Omics: GDC STAR gene counts in the real layout, tables of either orientation, and the feature
selection / medians fitted on training patients only."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_data_common import GDC_HEADER, GENES, write_gdc_star

from pyimputmae.data.manifest import Source
from pyimputmae.data.omics import (
    OmicsConfig,
    OmicsError,
    OmicsWarning,
    apply_omics,
    fit_omics,
    is_gdc_star,
    read_gdc_star_counts,
    read_omics,
    run_omics,
    screen_patients,
)

TPM = [27.6, 0.0, 112.3, 3.4, 1.2, 0.5, 14.0, 30.1, 9.9, 4.4, 50.0, 0.0, 2.0, 0.3]


def test_gdc_star_counts_parsed_like_the_gdc_file(tmp_path: Path):
    path = write_gdc_star(tmp_path / "a.rna_seq.augmented_star_gene_counts.tsv", GENES, TPM)
    assert path.read_text().startswith("# gene-model: GENCODE v36\ngene_id\tgene_name\tgene_type\tunstranded")
    assert is_gdc_star(path)
    s = read_gdc_star_counts(path)
    # N_* summary rows and lncRNAs dropped; versions stripped; the PAR_Y copy summed into CD99
    assert list(s.index) == [g[0].split(".")[0] for g in GENES[:11]]
    assert s["ENSG00000000003"] == pytest.approx(27.6) and s["ENSG00000002586"] == pytest.approx(50.0)
    by_name = read_gdc_star_counts(path, OmicsConfig(value="fpkm_uq_unstranded", gene_key="gene_name", gene_types=()))
    assert "HOTAIR" in by_name.index and by_name["TSPAN6"] == pytest.approx(27.6 * 0.35, abs=1e-3)
    counts = read_gdc_star_counts(path, OmicsConfig(value="unstranded"))
    assert counts["ENSG00000000003"] == int(27.6 * 37)



@pytest.mark.parametrize("layout", ["blank line", "whitespace lines", "crlf", "trailing whitespace"])
def test_gdc_star_file_with_blank_lines_crlf_or_trailing_whitespace_is_recognised(tmp_path: Path, layout: str):
    """Files that went through an editor or another tool: a blank line after the ``#`` comment, a
    line of spaces and tabs (also at the end), Windows line endings, spaces after each line."""
    reference = read_gdc_star_counts(write_gdc_star(tmp_path / "gdc.tsv", GENES, TPM))
    text = (tmp_path / "gdc.tsv").read_text()
    edited = {"blank line": text.replace("GENCODE v36\n", "GENCODE v36\n\n"),
              "whitespace lines": text.replace("GENCODE v36\n", "GENCODE v36\n \t \n") + "\t\n\n",
              "crlf": text.replace("GENCODE v36\n", "GENCODE v36\n\n").replace("\n", "\r\n"),
              "trailing whitespace": text.replace("GENCODE v36\n", "GENCODE v36\n\n").replace("\n", " \t\n")}[layout]
    path = tmp_path / "edited.tsv"
    path.write_bytes(edited.encode())
    assert is_gdc_star(path)
    pd.testing.assert_series_equal(read_gdc_star_counts(path), reference)
    # read as a STAR file by the "auto" reader (as a table it would fail: no patient's column)
    pd.testing.assert_series_equal(read_omics(path, "TCGA-AA-0001", OmicsConfig()), reference)


def test_tables_that_are_not_gdc_star_files_are_not_taken_for_one(tmp_path: Path):
    samples = ["TCGA-AA-0001", "TCGA-AA-0002"]
    # genes × samples with GDC's gene annotations (STAR files merged): no count column; after a comment
    # (and a blank line)
    merged = pd.DataFrame({"gene_id": [g[0] for g in GENES], "gene_name": [g[1] for g in GENES],
                           "gene_type": [g[2] for g in GENES], samples[0]: TPM, samples[1]: TPM[::-1]})
    (tmp_path / "merged.tsv").write_text("# merged by a script\n" + merged.to_csv(sep="\t", index=False))
    (tmp_path / "blank.tsv").write_text("# merged by a script\n\n" + merged.to_csv(sep="\t", index=False))
    merged.to_csv(tmp_path / "merged.csv", index=False)  # comma-separated: not a STAR file either
    for name in ("merged.tsv", "blank.tsv", "merged.csv"):
        assert not is_gdc_star(tmp_path / name)
        x = read_omics(tmp_path / name, samples[1], OmicsConfig())
        assert x[GENES[0][0]] == pytest.approx(TPM[-1]) and len(x) == len(GENES)
    (tmp_path / "comments.tsv").write_text("# gene_id\tgene_type\tunstranded\n\n \n")
    (tmp_path / "header_later.tsv").write_text("probe\tvalue\ngene_id\tgene_type\tunstranded\n")
    assert not is_gdc_star(tmp_path / "comments.tsv") and not is_gdc_star(tmp_path / "header_later.tsv")

def test_gdc_file_without_the_gene_column_names_file_patient_and_column(tmp_path: Path):
    columns = tuple(c for c in GDC_HEADER if c != "gene_name")
    path = write_gdc_star(tmp_path / "broken.tsv", GENES, TPM, columns=columns)
    with pytest.raises(OmicsError, match=r"broken.tsv \(patient 'TCGA-AA-0001'\): GDC STAR counts file has no "
                                         r"column\(s\) \['gene_name'\]"):
        read_gdc_star_counts(path, patient="TCGA-AA-0001")


def test_tables_of_both_orientations_parquet_and_headerless_beta(tmp_path: Path):
    genes = ["G1", "G2", "G3"]
    wide = pd.DataFrame([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], index=["TCGA-AA-0001-01A-11R", "TCGA-AA-0002-01A"],
                        columns=genes)
    wide.T.to_csv(tmp_path / "genes_x_samples.tsv", sep="\t")
    wide.to_parquet(tmp_path / "samples_x_genes.parquet")
    (tmp_path / "beta.txt").write_text("cg01\t0.25\ncg02\tNA\ncg03\t0.75\n")
    cfg = OmicsConfig.dnam()
    cache: dict = {}
    a = read_omics(tmp_path / "genes_x_samples.tsv", "TCGA-AA-0001", cfg, cache=cache)  # barcode prefix match
    b = read_omics(tmp_path / "samples_x_genes.parquet", "X", cfg, select="TCGA-AA-0002-01A")
    np.testing.assert_array_equal(a.to_numpy(), [1, 2, 3])
    np.testing.assert_array_equal(b.to_numpy(), [4, 5, 6])
    beta = read_omics(tmp_path / "beta.txt", "TCGA-AA-0003", cfg)
    assert list(beta.index) == ["cg01", "cg02", "cg03"] and np.isnan(beta["cg02"])
    with pytest.raises(OmicsError, match=r"genes_x_samples.tsv \(patient 'TCGA-ZZ-9999'\): no column or row named"):
        read_omics(tmp_path / "genes_x_samples.tsv", "TCGA-ZZ-9999", cfg, cache=cache)


def test_an_id_never_picks_a_longer_id_that_merely_starts_with_it(tmp_path: Path):
    # P1 has no column; P10 does: P1 must not silently get P10's values (only an id followed by a
    # separator, as in a TCGA sample barcode, is a prefix match)
    table = pd.DataFrame({"P10": [1.0, 2.0], "P2": [3.0, 4.0], "TCGA-AA-0001.01A": [5.0, 6.0]}, index=["G1", "G2"])
    table.to_csv(tmp_path / "matrix.tsv", sep="\t")
    cfg = OmicsConfig.dnam()
    with pytest.raises(OmicsError, match=r"matrix.tsv \(patient 'P1'\): no column or row named 'P1'"):
        read_omics(tmp_path / "matrix.tsv", "P1", cfg)
    np.testing.assert_array_equal(read_omics(tmp_path / "matrix.tsv", "TCGA-AA-0001", cfg).to_numpy(), [5, 6])
    frames, errors = run_omics_frames(tmp_path / "matrix.tsv", ["P1", "P10"], cfg)
    assert list(frames) == [1] and list(errors) == [0] and "no column or row named 'P1'" in errors[0]


def run_omics_frames(path: Path, ids: list[str], cfg: OmicsConfig) -> tuple[dict, dict]:
    from pyimputmae.data.omics import read_cohort_omics

    return read_cohort_omics(ids, [Source(path)] * len(ids), cfg)


def test_a_sample_barcode_id_against_a_case_barcode_table_says_how_to_pick_it(tmp_path: Path):
    table = pd.DataFrame({"G1": [1.0, 2.0], "G2": [3.0, 4.0]}, index=["TCGA-CS-4938", "TCGA-CS-4941"])
    table.to_csv(tmp_path / "rna.csv")
    with pytest.raises(OmicsError, match=r"rna.csv \(patient 'TCGA-CS-4938-01A'\): no column or row named "
                                         r"'TCGA-CS-4938-01A'.*the table has 'TCGA-CS-4938'.*"
                                         r"add #TCGA-CS-4938 to the path"):
        read_omics(tmp_path / "rna.csv", "TCGA-CS-4938-01A", OmicsConfig())


def test_a_table_without_a_known_separator_is_an_error_naming_the_file_not_a_crash(tmp_path: Path):
    (tmp_path / "beta.dat").write_text("cg01 0.25\ncg02 0.75\n")
    stage = run_omics(["P1"], [Source(tmp_path / "beta.dat")], np.array([True]), OmicsConfig.dnam(width=4))
    assert stage.status == ["failed"]
    assert re.search(r"beta.dat \(patient 'P1'\): cannot read the omics table: no tab, comma or semicolon in its "
                     r"first line 'cg01 0.25'", stage.errors[0])


def cohort(n_train: int = 30, n_test: int = 10, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    rng = np.random.default_rng(seed)
    genes = [f"G{j}" for j in range(40)]
    sd = np.where(np.arange(40) % 4 == 0, 0.01, 1.0)  # every 4th gene barely varies
    x = np.exp(rng.normal(3.0, sd, size=(n_train + n_test, 40)))
    train = np.arange(n_train + n_test) < n_train
    return pd.DataFrame(x, columns=genes), train


def test_feature_selection_ignores_test_patients(monkeypatch: pytest.MonkeyPatch):
    import pyimputmae.data.omics as omics

    raw, train = cohort()
    cfg = OmicsConfig.rna(width=64)
    fitted = fit_omics(raw[train], cfg)
    assert fitted["features"] == [f"G{j}" for j in range(40) if j % 4]  # std filter, file order
    # the test patients change wildly (and carry an extra gene): the fit is unchanged
    wild = raw.copy()
    wild.loc[~train, "G0"] = np.exp(np.linspace(0, 20, (~train).sum()))
    wild.insert(0, "EXTRA", np.where(train, np.nan, 5.0))
    ids = [f"P{i}" for i in range(len(raw))]
    sources = [Source(Path(f"p{i}.tsv")) for i in range(len(raw))]

    def stage(frame: pd.DataFrame) -> omics.OmicsStage:
        frames = {i: frame.iloc[[i]].set_axis([i]) for i in range(len(frame))}
        monkeypatch.setattr(omics, "read_cohort_omics", lambda *a, **k: (frames, {}))
        return run_omics(ids, sources, train, cfg)

    a, b = stage(raw), stage(wild)
    assert a.fitted == b.fitted and a.fitted["features"] == fitted["features"]
    np.testing.assert_array_equal(a.values[train], b.values[train])


def test_apply_log1p_median_normalisation_padding_and_nan_replacement():
    raw, train = cohort()
    fitted = fit_omics(raw[train], OmicsConfig.rna(width=64, min_std=0.0))
    medians = np.asarray(fitted["medians"])
    x = raw.copy()
    x.iloc[0, 3] = np.nan
    x.iloc[1, 5] = np.inf
    x.iloc[2, 7] = -1.0  # invalid for log1p
    out, replaced = apply_omics(x.drop(columns=["G9"]), fitted)  # G9 absent for every patient
    assert out.shape == (40, 1, 64) and out.dtype == np.float32
    assert replaced.tolist()[:4] == [2, 2, 2, 1]
    assert (out[:, 0, 40:] == 0).all()
    expected = np.log1p(raw.to_numpy())
    for (i, j) in ((0, 3), (1, 5), (2, 7)):
        expected[i, j] = medians[j]
    expected[:, 9] = medians[9]
    expected /= np.median(expected, axis=1, keepdims=True)
    np.testing.assert_allclose(out[:, 0, :40], expected, rtol=1e-5)


def test_fixed_gene_list_and_m_values():
    raw, train = cohort()
    fitted = fit_omics(raw[train], OmicsConfig.rna(gene_list=["G5", "G1", "NOT_MEASURED"], width=8))
    assert fitted["features"] == ["G5", "G1", "NOT_MEASURED"] and fitted["medians"][2] == 0.0
    m = pd.DataFrame({"cg1": [0.0, 1.0, -1.0]})
    beta = fit_omics(m, OmicsConfig.dnam(values="m_value", width=4))
    out, _ = apply_omics(m, beta)
    np.testing.assert_allclose(out[:, 0, 0], [0.5, 2 / 3, 1 / 3], rtol=1e-6)


def test_run_omics_records_a_bad_file_and_processes_the_rest(tmp_path: Path):
    good = [write_gdc_star(tmp_path / f"p{i}.tsv", GENES, [t * (1 + 0.3 * i) for t in TPM]) for i in range(4)]
    no_tpm = tuple(c for c in GDC_HEADER if c != "tpm_unstranded")
    bad = write_gdc_star(tmp_path / "bad.tsv", GENES, TPM, columns=no_tpm)
    ids = ["P0", "P1", "P2", "P3", "PBAD", "PNONE"]
    sources = [Source(p) for p in good] + [Source(bad), None]
    stage = run_omics(ids, sources, np.array([1, 1, 1, 0, 1, 1], bool), OmicsConfig.rna(min_std=0.0, width=16))
    assert stage.status == ["present"] * 4 + ["failed", "missing"]
    assert "bad.tsv (patient 'PBAD')" in stage.errors[4] and "tpm_unstranded" in stage.errors[4]
    assert (stage.values[4:] == 0).all() and (stage.values[:4] != 0).any()


def beta_cohort(tmp_path: Path) -> tuple[list[str], list[Source], np.ndarray]:
    """Six patients in one samples × probes beta table; P2's path is an RNA table (other features)."""
    rng = np.random.default_rng(1)
    ids = [f"P{i}" for i in range(6)]
    pd.DataFrame(rng.random((6, 10)), index=ids, columns=[f"cg{j:04d}" for j in range(10)]).to_csv(
        tmp_path / "beta.tsv", sep="\t")
    pd.DataFrame(rng.random((6, 5)), index=ids, columns=["TSPAN6", "TNMD", "DPM1", "SCYL3", "FGR"]).to_csv(
        tmp_path / "rna.tsv", sep="\t")
    sources = [Source(tmp_path / ("rna.tsv" if i == 2 else "beta.tsv")) for i in range(6)]
    return ids, sources, np.array([1, 1, 1, 1, 0, 0], bool)


def test_another_modalitys_file_is_left_out_and_does_not_grow_the_feature_set(tmp_path: Path):
    ids, sources, train = beta_cohort(tmp_path)
    cfg = OmicsConfig.dnam(width=32)
    stage = run_omics(ids, sources, train, cfg, name="dnam")
    assert stage.status == ["present", "present", "failed", "present", "present", "present"]
    assert stage.errors[2].startswith(f"{tmp_path / 'rna.tsv'} (patient 'P2'): dnam: only 0 of the 10 features at "
                                      "least half of the training patients have are in this patient's data")
    assert "unknown features such as TSPAN6, TNMD, DPM1" in stage.errors[2]
    assert "its platform or feature names" in stage.errors[2]
    assert stage.fitted["features"] == [f"cg{j:04d}" for j in range(10)]  # the majority's, not grown
    assert (stage.values[2] == 0).all() and stage.replaced.sum() == 0
    # the other patients are exactly what they are without the wrong file
    alone = run_omics(ids, [s if i != 2 else None for i, s in enumerate(sources)], train, cfg, name="dnam")
    np.testing.assert_array_equal(stage.values[[0, 1, 3, 4, 5]], alone.values[[0, 1, 3, 4, 5]])
    # new patients preprocessed with the fitted selection are screened against its features
    again = run_omics(ids, sources, np.zeros(6, bool), cfg, fitted=stage.fitted, name="dnam")
    assert again.status == stage.status and "only 0 of the 10 features the fitted preprocessing uses" in again.errors[2]


def test_beta_values_outside_0_1_are_named_unless_m_values(tmp_path: Path):
    ids, sources, train = beta_cohort(tmp_path)
    table = pd.read_csv(tmp_path / "beta.tsv", sep="\t", index_col=0)
    table.loc["P4", ["cg0001", "cg0005"]] = [2.5, -1.25]  # M-values among betas
    table.to_csv(tmp_path / "beta.tsv", sep="\t")
    sources[2] = sources[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error", OmicsWarning)  # one patient's file: no cohort-level warning
        stage = run_omics(ids, sources, train, OmicsConfig.dnam(width=32), name="dnam")
    assert stage.status == ["present"] * 4 + ["failed", "present"]
    assert stage.errors[4] == (
        f"{tmp_path / 'beta.tsv'} (patient 'P4'): dnam: 2 of 10 values lie outside [0, 1] (cg0001=2.5, cg0005=-1.25): "
        "not beta values. If the file holds M-values, set dnam.values to 'm_value' (--dnam-values m_value); "
        "otherwise check that it is this patient's dnam file. The patient's dnam is left out")
    m_values = run_omics(ids, sources, train, OmicsConfig.dnam(values="m_value", width=32), name="dnam")
    assert m_values.status == ["present"] * 6  # M-values may be any real number


def test_fitted_gene_list_screens_only_the_measured_genes():
    raw, train = cohort()
    fitted = fit_omics(raw[train], OmicsConfig.rna(gene_list=["G1", "NOT_1", "NOT_2", "NOT_3"], width=8))
    assert fitted["unmeasured"] == ["NOT_1", "NOT_2", "NOT_3"]
    frames = {0: raw.iloc[:3].set_axis([0, 1, 2])}
    errors = screen_patients(frames, ["A", "B", "C"], [Source(Path("a.tsv"))] * 3, np.zeros(3, bool), "raw", fitted)
    assert errors == {} and list(frames[0].index) == [0, 1, 2]


def test_every_patient_with_m_values_gets_one_cohort_level_warning(tmp_path: Path):
    ids, sources, train = beta_cohort(tmp_path)
    rng = np.random.default_rng(2)
    pd.DataFrame(rng.normal(0, 3, (6, 10)), index=ids, columns=[f"cg{j:04d}" for j in range(10)]).to_csv(
        tmp_path / "beta.tsv", sep="\t")
    sources[2] = sources[0]
    message = ("dnam: all 6 patients with a dnam file have values outside [0, 1]: the files look like M-values, not "
               "beta values. Set dnam.values to 'm_value' (--dnam-values m_value) and preprocess again")
    with pytest.warns(OmicsWarning, match=re.escape(message)) as caught:
        stage = run_omics(ids, sources, train, OmicsConfig.dnam(width=32), name="dnam")
    assert len([w for w in caught if issubclass(w.category, OmicsWarning)]) == 1
    assert stage.status == ["failed"] * 6  # the per-patient records stay
    for i in range(6):
        assert stage.errors[i].startswith(f"{tmp_path / 'beta.tsv'} (patient 'P{i}'): dnam: ")
        assert stage.errors[i].endswith(": not beta values, like every patient's dnam file: they look like M-values; "
                                        "set dnam.values to 'm_value' (--dnam-values m_value). The patient's dnam "
                                        "is left out")


def test_patients_on_a_smaller_platform_are_kept(tmp_path: Path):
    """30% of the patients on a smaller array (20 probes, half of them among the majority's 200, as a
    27k array among 450k arrays) are kept, their missing probes filled with training medians; an RNA
    table given as DNAm still is not."""
    rng = np.random.default_rng(3)
    big_ids, small_ids = [f"B{i}" for i in range(14)], [f"S{i}" for i in range(6)]
    big = [f"cg{j:04d}" for j in range(200)]
    small = big[:10] + [f"cg9{j:03d}" for j in range(10)]
    pd.DataFrame(rng.random((14, 200)), index=big_ids, columns=big).to_csv(tmp_path / "450k.tsv", sep="\t")
    pd.DataFrame(rng.random((6, 20)), index=small_ids, columns=small).to_csv(tmp_path / "27k.tsv", sep="\t")
    pd.DataFrame(rng.random((1, 5)), index=["R"], columns=["TSPAN6", "TNMD", "DPM1", "SCYL3", "FGR"]).to_csv(
        tmp_path / "rna.tsv", sep="\t")
    ids = big_ids + small_ids + ["R"]
    sources = ([Source(tmp_path / "450k.tsv")] * 14 + [Source(tmp_path / "27k.tsv")] * 6
               + [Source(tmp_path / "rna.tsv")])
    train = np.ones(len(ids), bool)
    stage = run_omics(ids, sources, train, OmicsConfig.dnam(width=256), name="dnam")
    assert stage.status == ["present"] * 20 + ["failed"]
    assert stage.errors[20].startswith(f"{tmp_path / 'rna.tsv'} (patient 'R'): dnam: only 0 of the 200 features")
    assert stage.fitted["features"] == big + small[10:]  # the smaller platform's own probes too
    assert stage.replaced[14:20].tolist() == [190] * 6 and stage.replaced[:14].tolist() == [10] * 14
    # new patients on the smaller platform, preprocessed with the fitted selection, are kept too
    again = run_omics(ids, sources, np.zeros(len(ids), bool), OmicsConfig.dnam(width=256), fitted=stage.fitted,
                      name="dnam")
    assert again.status == stage.status

"""Brain MRI from the real MNI152 templates (written to NIfTI here) with a synthetic tumour mask:
tumour-centred crop, z-score inside the brain, sequences as channels, geometry and dimension checks,
the other file formats SimpleITK reads."""

from __future__ import annotations

import locale
from pathlib import Path

import numpy as np
import pytest
from test_data_common import mni_volumes, write_mni_case

from pyimputmae.data.manifest import Source
from pyimputmae.data.mri import MriConfig, MriError, find_case_files, preprocess_mri, read_volume, resolve_mri_paths

sitk = pytest.importorskip("SimpleITK", reason="SimpleITK is needed for MRI")
nib = pytest.importorskip("nibabel", reason="nibabel writes the test volumes")

FOUR = MriConfig(sequences=("t1", "t1ce", "t2", "flair"), spacing=2.0, crop=(24, 24, 24))


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_mni_case(tmp_path_factory.mktemp("mni"))


def test_four_sequences_become_channels_of_a_tumour_centred_crop(case: dict[str, Path]):
    r = preprocess_mri(case, FOUR, patient="TCGA-XX-0001")
    assert r.volume.shape == (4, 24, 24, 24) and r.volume.dtype == np.float32
    assert r.center_source == "tumor_mask"
    # the enhancing tumour (brightest T1ce voxels) sits at the centre of the crop
    t1ce = r.volume[1]
    np.testing.assert_allclose(np.argwhere(t1ce >= 0.9 * t1ce.max()).mean(axis=0), [12, 12, 12], atol=1.0)
    # channels differ (T1 template, grey matter, white matter), and outside the brain is 0
    assert not np.allclose(r.volume[0], r.volume[2])
    assert np.all(r.volume[:, ~r.brain] == 0)


def test_z_score_inside_the_brain(case: dict[str, Path]):
    cfg = MriConfig(sequences=("t1",), spacing=2.0, crop=(128, 128, 128))  # larger than the head: all of it
    r = preprocess_mri({k: case[k] for k in ("t1", "brain_mask")}, cfg)
    assert r.center_source == "brain_mask"
    inside = r.volume[0][r.brain]
    assert inside.mean() == pytest.approx(0.0, abs=1e-4) and inside.std() == pytest.approx(1.0, abs=1e-4)
    expected_voxels = int(((mni_volumes()[1] + mni_volumes()[2]) > 0.2).sum())
    assert r.brain.sum() == expected_voxels


def test_resampling_to_isotropic_spacing_and_centre_fallbacks(case: dict[str, Path]):
    r = preprocess_mri({"t1ce": case["t1ce"]}, MriConfig(spacing=4.0, crop=(8, 8, 8)))
    assert r.volume.shape == (1, 8, 8, 8) and r.center_source == "intensity"
    # at 4 mm the 99×117×95 grid at 2 mm becomes about half as many voxels per axis
    img = read_volume(case["t1ce"])
    assert img.GetSize() == (99, 117, 95)
    with_tumour = preprocess_mri({"t1ce": case["t1ce"], "tumor_mask": case["tumor_mask"]},
                                 MriConfig(spacing=1.0, crop=(16, 16, 16)))
    np.testing.assert_allclose(with_tumour.center, [80, 132, 76], atol=1)  # 2× the 2 mm index (40, 66, 38)


def test_mismatched_geometry_names_files_and_values(case: dict[str, Path], tmp_path: Path):
    _, gm, _, affine = mni_volumes()
    shifted = affine.copy()
    shifted[:3, 3] += 6.0
    nib.save(nib.Nifti1Image(gm, shifted), tmp_path / "t2_moved.nii.gz")
    paths = {**case, "t2": tmp_path / "t2_moved.nii.gz"}
    with pytest.raises(MriError, match=r"t2_moved.nii.gz \(patient 'TCGA-XX-0002'\): t2 origin .* does not match t1"):
        preprocess_mri(paths, FOUR, patient="TCGA-XX-0002")
    nib.save(nib.Nifti1Image(gm[:-1], affine), tmp_path / "t2_small.nii.gz")
    with pytest.raises(MriError, match=r"t2 size \(98, 117, 95\) does not match t1 \(99, 117, 95\)"):
        preprocess_mri({**case, "t2": tmp_path / "t2_small.nii.gz"}, FOUR, patient="P")


def test_wrong_dimensionality_names_file_patient_and_shape(tmp_path: Path):
    t1, _, _, affine = mni_volumes()
    nib.save(nib.Nifti1Image(t1[:, :, 40], affine), tmp_path / "slice.nii.gz")
    with pytest.raises(MriError, match=r"slice.nii.gz \(patient 'TCGA-XX-0003'\) \[t1ce\]: expected a 3-D volume, "
                                       r"got a 2-D image of size \(99, 117\)"):
        preprocess_mri({"t1ce": tmp_path / "slice.nii.gz"}, MriConfig(), patient="TCGA-XX-0003")
    nib.save(nib.Nifti1Image(np.stack([t1, t1], -1), affine), tmp_path / "series.nii.gz")
    with pytest.raises(MriError, match=r"got a 4-D image of size \(99, 117, 95, 2\)"):
        read_volume(tmp_path / "series.nii.gz", "P")
    nib.save(nib.Nifti1Image(t1[..., None], affine), tmp_path / "single.nii.gz")  # (x, y, z, 1) is 3-D
    assert read_volume(tmp_path / "single.nii.gz").GetDimension() == 3


def test_nrrd_mha_and_dicom_series_read_like_the_nifti(case: dict[str, Path], tmp_path: Path):
    ref = read_volume(case["t1"])
    sitk.WriteImage(ref, str(tmp_path / "t1.nrrd"))
    sitk.WriteImage(ref, str(tmp_path / "t1.mha"))
    for name in ("t1.nrrd", "t1.mha"):
        img = read_volume(tmp_path / name)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(ref))
        assert img.GetSpacing() == ref.GetSpacing() and img.GetOrigin() == ref.GetOrigin()
    series = tmp_path / "T1_DICOM"
    write_dicom_series(sitk.Cast(ref * 1000, sitk.sitkInt16), series)
    img = read_volume(series)
    assert img.GetSize() == ref.GetSize()
    np.testing.assert_allclose(img.GetSpacing(), ref.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(img.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(sitk.Cast(ref * 1000,
                                                                                               sitk.sitkInt16)))
    r = preprocess_mri({"t1": series}, MriConfig(sequences=("t1",), spacing=2.0, crop=(16, 16, 16)))
    assert r.volume.shape == (1, 16, 16, 16)


def write_dicom_series(image: sitk.Image, folder: Path) -> None:
    """One file per axial slice with the position/orientation tags a reader needs.

    GDCM's DICOM writer sets the process locale to "C" and leaves it there (Python's default text
    encoding becomes ASCII for every later test in the process), so the locale is put back."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_dicom_slices(image, folder)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_dicom_slices(image: sitk.Image, folder: Path) -> None:
    folder.mkdir()
    d = image.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(image.GetDepth()):
        s = image[:, :, k]
        position = "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))
        for tag, value in (("0008|0060", "MR"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.2"), ("0020|0013", str(k + 1)),
                           ("0020|0037", orientation), ("0018|0050", str(image.GetSpacing()[2])),
                           ("0020|0032", position)):
            s.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(s)


def test_brats_folder_and_per_sequence_sources(case: dict[str, Path]):
    folder = case["t1"].parent
    assert find_case_files(folder) == {k: case[k] for k in ("t1", "t1ce", "t2", "flair", "tumor_mask", "brain_mask")}
    paths = resolve_mri_paths(Source(folder), FOUR, "P")
    assert paths["t1ce"] == case["t1ce"] and paths["tumor_mask"] == case["tumor_mask"]
    single = resolve_mri_paths(Source(case["t1ce"], parts=(("tumor_mask", case["tumor_mask"]),)), MriConfig(), "P")
    assert single == {"t1ce": case["t1ce"], "tumor_mask": case["tumor_mask"]}
    with pytest.raises(MriError, match=r"\(patient 'P'\): no t1, t2, flair sequence found"):
        resolve_mri_paths(Source(case["t1ce"]), FOUR, "P")


def test_nan_background_reads_as_zero_and_infinite_voxels_are_named(case: dict[str, Path], tmp_path: Path):
    # an MHA export with NaN outside the head (SimpleITK keeps NaN in MHA/NRRD; its NIfTI reader reads 0):
    # the same result as the zero background, with a note, never an ITK error or a silently empty volume
    img = sitk.ReadImage(str(case["t1ce"]))
    a = sitk.GetArrayFromImage(img)
    nan = sitk.GetImageFromArray(np.where(a == 0, np.nan, a).astype(np.float32))
    nan.CopyInformation(img)
    sitk.WriteImage(nan, str(tmp_path / "t1ce_nan.mha"))
    cfg = MriConfig(spacing=4.0, crop=(16, 16, 16))
    for extra in ({}, {"brain_mask": case["brain_mask"]}):
        want = preprocess_mri({"t1ce": case["t1ce"], **extra}, cfg, patient="P1")
        got = preprocess_mri({"t1ce": tmp_path / "t1ce_nan.mha", **extra}, cfg, patient="P1")
        np.testing.assert_allclose(got.volume, want.volume, atol=1e-5)
        assert np.abs(got.volume).sum() > 0 and list(got.center) == list(want.center)
        assert any(f"t1ce_nan.mha (patient 'P1') [t1ce]: {int((a == 0).sum())} of {a.size} voxels are NaN; "
                   "read as 0 (background)" in w for w in got.warnings)
    inf = sitk.GetImageFromArray(np.where(a == a.max(), np.inf, a).astype(np.float32))
    inf.CopyInformation(img)
    sitk.WriteImage(inf, str(tmp_path / "t1ce_inf.mha"))
    with pytest.raises(MriError, match=rf"t1ce_inf.mha \(patient 'P1'\) \[t1ce\]: {int((a == a.max()).sum())} "
                                       r"voxels are infinite"):
        preprocess_mri({"t1ce": tmp_path / "t1ce_inf.mha"}, cfg, patient="P1")

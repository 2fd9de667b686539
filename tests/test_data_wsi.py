"""Whole-slide images: tissue detection and tiling of the real Aperio slide; damaged slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_data_common import SLIDE, need, stained_section, write_tiled_tiff

from pyimputmae.data.wsi import (
    SlideError,
    WsiConfig,
    otsu_threshold,
    saturation,
    slide_mpp,
    slide_resolution,
    tile_slide,
)

pytest.importorskip("openslide", reason="openslide-python + openslide-bin are needed for slides")

SMALL = WsiConfig(tile_px=64, mpp=1.0, n_candidates=12, n_keep=4)


def test_otsu_splits_two_populations():
    values = np.r_[np.full(500, 20), np.full(300, 200)].astype(np.uint8)
    assert 20 <= otsu_threshold(values) < 200
    rgb = np.array([[[255, 255, 255], [200, 100, 150]]], dtype=np.uint8)
    np.testing.assert_array_equal(saturation(rgb), [[0, 127]])


def test_real_slide_tiles_tissue_at_the_requested_size():
    slide = need(SLIDE, "the real Aperio slide cmu_small_region.svs")
    r = tile_slide(slide, SMALL, patient="TCGA-CS-4938")
    assert r.slide_mpp == pytest.approx(0.499)
    assert r.n_tissue > 20  # H&E tissue covers a good part of this slide
    assert r.tiles.shape == (4, 3, 64, 64) and r.tiles.dtype == np.uint8
    assert np.all(np.diff(r.scores) <= 0)  # best first
    # a tissue tile is stained (saturated), not white background
    assert saturation(r.tiles[0].transpose(1, 2, 0)).mean() > 40
    assert r.tiles[0].mean() < 220
    # 64 px at 1 µm/px is 128.26 level-0 px at 0.499 µm/px: corners on that grid, inside the slide
    grid = r.coords / (64 * 1.0 / 0.499)
    np.testing.assert_allclose(grid, np.round(grid), atol=0.01)
    assert np.all(r.coords[:, 0] + 128 <= 2220) and np.all(r.coords[:, 1] + 128 <= 2967)


def test_best_tile_is_deterministic():
    slide = need(SLIDE, "the real Aperio slide cmu_small_region.svs")
    a, b = tile_slide(slide, SMALL), tile_slide(slide, SMALL)
    np.testing.assert_array_equal(a.tiles, b.tiles)
    np.testing.assert_array_equal(a.coords, b.coords)


def test_truncated_slide_names_file_and_patient(tmp_path: Path):
    slide = need(SLIDE, "the real Aperio slide cmu_small_region.svs")
    broken = tmp_path / "truncated.svs"
    broken.write_bytes(slide.read_bytes()[:200_000])
    with pytest.raises(SlideError, match=r"truncated.svs \(patient 'TCGA-XX-0001'\): not a slide OpenSlide can read"):
        tile_slide(broken, SMALL, patient="TCGA-XX-0001")


def test_slide_without_tissue_or_resolution_is_an_error(tmp_path: Path):
    from PIL import Image

    blank = tmp_path / "blank.tiff"
    Image.new("RGB", (512, 512), (250, 250, 250)).save(blank)
    with pytest.raises(SlideError, match=r"blank.tiff \(patient 'P'\): .*(not a slide|resolution)"):
        tile_slide(blank, SMALL, patient="P")


class _Props:
    def __init__(self, **props: str) -> None:
        self.properties = {f"openslide.{k.replace('_', '-')}": v for k, v in props.items()}


FLAGS = r"set --wsi-force-mpp \(WsiConfig.force_mpp\) to the slides' true µm/px at level 0, or --wsi-default-mpp"


def test_a_recorded_resolution_that_is_not_positive_falls_back_to_default_mpp():
    assert slide_mpp(_Props(mpp_x="0.25", mpp_y="0.25"), WsiConfig(), "s.svs") == 0.25
    assert slide_mpp(_Props(mpp_x="0", mpp_y="0"), WsiConfig(default_mpp=0.5), "s.svs") == 0.5
    # 0 and NaN stand for "not recorded" (Aperio's MPP = 0): no note
    assert slide_resolution(_Props(mpp_x="0", mpp_y="0"), WsiConfig(default_mpp=0.5), "s.svs").note is None
    zero = r"records an unusable resolution \(openslide.mpp-x/-y = '0'/'0'\)"
    for props, what in ((_Props(mpp_x="0", mpp_y="0"), zero),
                        (_Props(mpp_x="nan", mpp_y="0.5"), r"records an unusable resolution \(.*'nan'/'0.5'\)"),
                        (_Props(), "does not record its resolution")):
        with pytest.raises(SlideError, match=rf"s.svs \(patient 'P'\): the slide {what}; {FLAGS}"):
            slide_mpp(props, WsiConfig(), "s.svs (patient 'P')")


def test_a_recorded_resolution_outside_the_plausible_range_is_not_believed():
    where = "s.tiff (patient 'P')"
    for value, shown, why in (("352.7777", "352.8", "export default such as 72 dpi"), ("10000", "10,000", "72 dpi"),
                              ("0.01", "0.01", "in other units")):
        props = _Props(mpp_x=value, mpp_y=value)
        with pytest.raises(SlideError, match=rf"s.tiff \(patient 'P'\): the slide records {shown} µm/px "
                           rf"\(openslide.mpp-x/-y = '{value}'/'{value}'\), outside the 0.05–20 µm/px of a "
                           rf"whole-slide image at level 0 \(.*{why}.*\); {FLAGS}"):
            slide_resolution(props, WsiConfig(), where)
        r = slide_resolution(props, WsiConfig(default_mpp=0.46), where)
        assert (r.mpp, r.source, r.recorded) == (0.46, "default_mpp", float(value))
        assert r.note.startswith(f"{where}: the slide records {shown} µm/px") and \
            r.note.endswith("; tiled as 0.46 µm/px (--wsi-default-mpp)")
    # the bounds themselves are plausible; an override wins over anything recorded, and needs no note
    assert slide_mpp(_Props(mpp_x="0.05", mpp_y="0.05"), WsiConfig(), where) == 0.05
    assert slide_mpp(_Props(mpp_x="20", mpp_y="20"), WsiConfig(), where) == 20.0
    for props in (_Props(mpp_x="0.25", mpp_y="0.25"), _Props(mpp_x="352.8", mpp_y="352.8"), _Props()):
        r = slide_resolution(props, WsiConfig(force_mpp=0.3, default_mpp=0.46), where)
        assert (r.mpp, r.source, r.note) == (0.3, "force_mpp", None)
    for name in ("force_mpp", "default_mpp"):
        for bad in (0.0, -0.5):
            with pytest.raises(ValueError, match=rf"WsiConfig.{name} \(--wsi-{name.replace('_', '-')}\) must be a "
                               rf"positive number of µm/px, got {bad}"):
                WsiConfig(**{name: bad})
        with pytest.raises(ValueError, match=rf"WsiConfig.{name} must be a number .* NaN and infinity are not"):
            WsiConfig(**{name: float("nan")})


@pytest.mark.parametrize(("resolution", "unit", "recorded", "shown"),
                         [(72, "inch", 352.78, "352.8"), (1, "centimeter", 10_000, "10,000")])
def test_a_tiff_with_an_export_default_resolution_is_not_tiled_at_it(tmp_path: Path, resolution: float, unit: str,
                                                                      recorded: float, shown: str):
    # a TIFF written by a tool that left its resolution tags at a default: OpenSlide reports them
    path = write_tiled_tiff(tmp_path / "export.tiff", stained_section(), resolution, unit)
    with pytest.raises(SlideError, match=rf"export.tiff \(patient 'P7'\): the slide records {shown} µm/px "
                       rf"\(openslide.mpp-x/-y = .*, from the TIFF tags XResolution = {resolution} per {unit}\), "
                       rf"outside the 0.05–20 µm/px .*; {FLAGS}"):
        tile_slide(path, SMALL, patient="P7")
    r = tile_slide(path, WsiConfig(**{**SMALL.to_dict(), "default_mpp": 0.5}), patient="P7")
    assert (r.slide_mpp, r.mpp_source) == (0.5, "default_mpp") and r.recorded_mpp == pytest.approx(recorded, rel=1e-4)
    assert len(r.warnings) == 1 and "export.tiff (patient 'P7'): the slide records" in r.warnings[0]
    assert r.warnings[0].endswith("tiled as 0.5 µm/px (--wsi-default-mpp)")
    # 64 px at 1 µm/px are 128 level-0 px at 0.5 µm/px: a 768 px section is a 6 × 6 grid
    np.testing.assert_array_equal(r.coords % 128, 0)
    assert r.tiles.shape == (4, 3, 64, 64) and r.n_tissue == 16
    # the same section with its true resolution recorded (20,000 px/cm) is tiled alike, from the file
    true = tile_slide(write_tiled_tiff(tmp_path / "true.tiff", stained_section(), 20_000, "centimeter"), SMALL)
    assert (true.slide_mpp, true.mpp_source, true.warnings) == (0.5, "file", [])
    np.testing.assert_array_equal(true.tiles, r.tiles)


def test_force_mpp_wins_over_the_resolution_the_slide_records():
    slide = need(SLIDE, "the real Aperio slide cmu_small_region.svs")
    r = tile_slide(slide, WsiConfig(**{**SMALL.to_dict(), "force_mpp": 0.25}), patient="TCGA-CS-4938")
    assert (r.slide_mpp, r.mpp_source, r.warnings) == (0.25, "force_mpp", [])
    assert r.recorded_mpp == pytest.approx(0.499)
    # 64 px at 1 µm/px are now 256 level-0 px (at the recorded 0.499 µm/px they would be 128.26)
    np.testing.assert_array_equal(r.coords % 256, 0)
    assert r.n_tissue < tile_slide(slide, SMALL).n_tissue
    with pytest.raises(SlideError, match=r"cmu_small_region.svs \(patient 'P'\): the slide's resolution 2.000 µm/px "
                       r"\(--wsi-force-mpp\) is coarser than the requested 1.0 µm/px \(--wsi-mpp\)"):
        tile_slide(slide, WsiConfig(**{**SMALL.to_dict(), "force_mpp": 2.0}), patient="P")

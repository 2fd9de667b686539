"""Whole-slide images: tissue detection and tiling of the real Aperio slide; damaged slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_data_common import SLIDE, need

from pyimputmae.data.wsi import SlideError, WsiConfig, otsu_threshold, saturation, slide_mpp, tile_slide

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


def test_a_recorded_resolution_that_is_not_positive_falls_back_to_default_mpp():
    assert slide_mpp(_Props(mpp_x="0.25", mpp_y="0.25"), WsiConfig(), "s.svs") == 0.25
    assert slide_mpp(_Props(mpp_x="0", mpp_y="0"), WsiConfig(default_mpp=0.5), "s.svs") == 0.5
    zero = r"records an unusable resolution \(openslide.mpp-x/-y = '0'/'0'\)"
    for props, what in ((_Props(mpp_x="0", mpp_y="0"), zero),
                        (_Props(mpp_x="nan", mpp_y="0.5"), r"records an unusable resolution \(.*'nan'/'0.5'\)"),
                        (_Props(), "does not record its resolution")):
        with pytest.raises(SlideError, match=rf"s.svs \(patient 'P'\): the slide {what}; set WsiConfig.default_mpp"):
            slide_mpp(props, WsiConfig(), "s.svs (patient 'P')")
